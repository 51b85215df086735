"""Prunable structures of transformers: attention heads and MLP neurons, as *sites*.

A site is one structure whose units (heads, kv-head groups, or MLP neurons) shrink together, read by
one *consumer* — the ``nn.Linear`` whose input columns are the units' outputs concatenated (the
attention's output projection, the MLP's down projection). Pruning a unit removes its rows in the
producers (q/k/v rows of a head; up/fc1 and gate rows of a neuron) and its columns in the consumer,
which is then reconstructed by least squares on calibration statistics, exactly as a channel group's
consumer is (:mod:`mipprune.pruning.bridge`, :class:`solvers.SelectionProblem`).

Every model family is an *adapter* (:class:`SiteAdapter`) that finds its sites and knows its surgery;
the selection, budgets and block-by-block calibration are family-independent and only see sites.
The residual stream (read through LayerNorm / RMSNorm by every block) is never a site: it stays whole.

Contract (shared by the adapters in ``transformer_*.py``):

* ``adapter.prepare(model)`` returns a *copy* of the model in which every site's consumer is a plain
  ``nn.Linear`` called with the units' outputs as its input (so forward hooks can capture ``Z``):
  e.g. ``nn.MultiheadAttention`` is swapped for an equivalent module with explicit projections,
  GPT-2's ``Conv1D`` for ``nn.Linear``. Outputs must match the original to 1e-6 relative. Adapters
  whose models already qualify return ``copy.deepcopy(model)``.
* ``adapter.sites(prepared)`` lists the sites in forward order.
* ``site.apply(prepared, keep, weight, bias)`` prunes ``prepared`` *in place* (it is our copy):
  ``keep`` is a sorted int array of kept unit indices; ``weight`` a float64 array (kept columns,
  out_features) in the bridge layout (``consumer.weight.T`` restricted to kept columns), or ``None`` to
  keep the consumer's current columns; ``bias`` (out_features,) or ``None`` to leave the bias. The
  module must still run afterwards, and its config (head counts, intermediate size) must say the
  new sizes so ``save_pretrained`` / ``from_pretrained`` round-trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np
import torch
from torch import nn

from solvers.errors import InvalidInputError

SiteKind = Literal["heads", "neurons"]

# Config field of a pruned Hugging Face model: the kept units per site (see transformer_hf.record_sizes).
SIZES_FIELD = "mipprune_layer_sizes"


@dataclass
class Site:
    """One attention module's heads or one MLP's neurons.

    Attributes
    ----------
    kind : "heads" or "neurons"
    name : str
        Qualified name of the attention / MLP module (e.g. ``"model.layers.3.self_attn"``).
    block : str
        Qualified name of the enclosing transformer block: the unit of block-by-block calibration.
    consumer : str
        Qualified name of the ``nn.Linear`` whose input columns are the units' outputs.
    n_units : int
        Units that can be kept or removed: query heads (MHA), kv groups (grouped-query attention: a
        kv head with the query heads that share it), or neurons.
    unit_columns : int
        Consumer input columns per unit (``head_dim``, ``head_dim · q heads per kv head``, or 1).
    params_per_unit : int
        Parameters removed with one unit (producer rows + biases + consumer columns).
    flops_per_unit : Callable[[int], int]
        Multiply-accumulates removed with one unit per token at a sequence length (attention scores
        and the weighted sum grow with it).
    apply : Callable[[nn.Module, np.ndarray, np.ndarray | None, np.ndarray | None], None]
        Surgery, see the module docstring.
    min_units : int
        The fewest units the module can keep (1 by default: a module with 0 heads is not run).
    info : dict
        Family-specific facts for the report (e.g. ``{"heads": 8, "kv_heads": 2, "head_dim": 32}``).
    producer_weights : Callable[[nn.Module], list[torch.Tensor]] or None
        Optional: the producers' weights of the site in ``prepared``, torch layout ``(out, in)``, each
        with its rows in ``n_units`` equal consecutive blocks (q / k / v, gate / up, fc1 rows), for
        the Torch-Pruning magnitude criterion; ``None``: the consumer alone.
    """

    kind: SiteKind
    name: str
    block: str
    consumer: str
    n_units: int
    unit_columns: int
    params_per_unit: int
    flops_per_unit: Callable[[int], int]
    apply: Callable[[nn.Module, np.ndarray, "np.ndarray | None", "np.ndarray | None"], None]
    min_units: int = 1
    info: dict = field(default_factory=dict)
    producer_weights: "Callable[[nn.Module], list[torch.Tensor]] | None" = None

    @property
    def n_columns(self) -> int:
        """Consumer input columns: ``n_units · unit_columns``."""
        return self.n_units * self.unit_columns

    def column_units(self) -> np.ndarray:
        """Unit index of each consumer input column, shape (n_columns,): the ``groups`` of a
        :class:`solvers.SelectionProblem`."""
        return np.repeat(np.arange(self.n_units), self.unit_columns)


class SiteAdapter(Protocol):
    """A model family: recognises its models, makes them hookable, lists their sites."""

    family: str

    def matches(self, model: nn.Module) -> bool: ...

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def sites(self, prepared: nn.Module) -> list[Site]: ...

    # Optional: ``finish(prepared) -> nn.Module`` turns a pruned prepared copy back into the family's
    # own module types (GPT-2: ``nn.Linear`` back to ``Conv1D``) and writes the new sizes into its
    # config; adapters without it hand the prepared copy back as is (see :func:`finish`).


def finish(adapter, prepared: nn.Module) -> nn.Module:
    """``adapter.finish(prepared)`` when the adapter has one, else ``prepared`` itself."""
    fn = getattr(adapter, "finish", None)
    return prepared if fn is None else fn(prepared)


def check_keep(site: Site, keep) -> np.ndarray:
    """``keep`` as sorted distinct int64 unit indices of ``site`` (at least ``site.min_units``); raises
    ``InvalidInputError`` otherwise (shared by the adapters' surgery, before anything is modified)."""
    k = np.asarray(keep)
    if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)):
        raise InvalidInputError(f"keep of site {site.name!r} must be a 1-D integer array of unit indices; "
                                f"got shape {k.shape}, dtype {k.dtype}")
    k = k.astype(np.int64)
    if k.size < site.min_units:
        raise InvalidInputError(f"keep of site {site.name!r} must hold at least {site.min_units} unit(s); got {k.size}")
    if k.min() < 0 or k.max() >= site.n_units or np.any(np.diff(k) <= 0):
        raise InvalidInputError(f"keep of site {site.name!r} must be sorted distinct unit indices in "
                                f"[0, {site.n_units}); got {k.tolist()[:12]}")
    return k


def _rows(t: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` restricted to ``index`` along ``dim``, contiguous (shared by the adapters' surgery)."""
    return t.detach().index_select(dim, index.to(t.device)).contiguous().clone()


# Adapters live in one module per family set; the registry imports them lazily so that a missing
# optional dependency (transformers, torchvision) only disables its own families.
ADAPTER_MODULES = ("mipprune.pruning.transformer_hf", "mipprune.pruning.transformer_torch")


def find_adapter(model: nn.Module) -> "SiteAdapter | None":
    """The first registered adapter whose ``matches(model)`` is true (each module lists ``ADAPTERS``)."""
    import importlib

    for path in ADAPTER_MODULES:
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as exc:  # the module itself not written yet / optional dep absent
            if exc.name in (path, "transformers", "torchvision"):
                continue
            raise
        for adapter in getattr(mod, "ADAPTERS", ()):
            if adapter.matches(model):
                return adapter
    return None
