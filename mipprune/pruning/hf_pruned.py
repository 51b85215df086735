"""Let the stock ``from_pretrained`` load a Hugging Face model pruned to per-layer widths.

A Hugging Face config has one head count and one intermediate size for every layer, so a model whose
layers kept different widths cannot be rebuilt by its own class. Pruned models of that kind are
re-classed as ``Mippruned<Class>`` (a subclass with the same layout: every method, ``generate`` and
``isinstance`` checks behave as before) and registered for ``AutoModelForCausalLM`` (or the auto class of
the family), so ``save_pretrained`` writes this file beside the weights with an ``auto_map`` entry, and

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds the model: the subclass's ``__init__`` builds the dense skeleton from the config and cuts each
site to the width recorded in the config's ``mipprune_layer_sizes`` before the weights load.
:func:`mipprune.load_pruned` loads the same folders without remote code.

The classes are made on demand (module ``__getattr__``), one per base class, so that pickling and
``transformers``' dynamic-module loader find them by name.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from torch import nn

from mipprune.pruning.transformer_sites import SIZES_FIELD, find_adapter, finish
from solvers.errors import InvalidInputError, UnsupportedLayerError

_PREFIX = "Mippruned"
_CLASSES: dict[str, type] = {}


def shrink_to_recorded_sizes(model, config) -> None:
    """Cut a dense skeleton built from ``config`` to the widths in its ``mipprune_layer_sizes``, in place
    (the weights are then loaded into it)."""
    sizes = getattr(config, SIZES_FIELD, None)
    if not sizes:
        return
    adapter = find_adapter(model)
    if adapter is None:
        raise UnsupportedLayerError(f"model class {type(model).__name__} has no mipprune site adapter to rebuild "
                                    f"its pruned sizes")
    prepared = adapter.prepare(model)
    units = sizes.get("units", {})
    for site in adapter.sites(prepared):
        k = units.get(site.name)
        if k is None or not 1 <= int(k) <= site.n_units:
            raise InvalidInputError(f"{SIZES_FIELD}['units'][{site.name!r}] must be in [1, {site.n_units}]; got {k!r}")
        if int(k) < site.n_units:
            site.apply(prepared, np.arange(int(k)), None, None)
    for name in sizes.get("consumer_bias", []):
        lin = prepared.get_submodule(name)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    finished = finish(adapter, prepared)
    for name, child in finished.named_children():  # the cut modules move into the skeleton itself
        setattr(model, name, child)


def pruned_class(base: type) -> type:
    """The ``Mippruned<base>`` subclass of a transformers model class (made once, cached)."""
    name = _PREFIX + base.__name__
    cls = _CLASSES.get(name)
    if cls is None:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            shrink_to_recorded_sizes(self, config)

        cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
        _CLASSES[name] = cls
    return cls


def base_class_name(name: str) -> str:
    """``"MipprunedLlamaForCausalLM"`` → ``"LlamaForCausalLM"`` (other names unchanged)."""
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def __getattr__(name: str):
    if name.startswith(_PREFIX):
        base = getattr(transformers, name[len(_PREFIX):], None)
        if isinstance(base, type):
            return pruned_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
