"""Site adapters for Hugging Face decoder LLMs — LLaMA / Qwen2 / Mistral, OPT, GPT-2 — and the
saving / loading of pruned ones.

Every adapter follows the contract of :mod:`mipprune.pruning.transformer_sites`: ``prepare`` copies
the model (GPT-2's ``Conv1D`` projections become ``nn.Linear`` so that hooks see ``Z``), ``sites``
lists per decoder layer one attention site (consumer: the output projection) and one MLP site
(consumer: the down projection / ``fc2``), ``finish`` turns a pruned copy back into the family's own
modules and writes its sizes into the config. The residual stream (hidden size, embeddings, norms)
is never a site: it stays whole.

Units
-----
* **Multi-head attention** (OPT, GPT-2, LLaMA with ``num_key_value_heads == num_attention_heads``):
  one unit per head, ``head_dim`` consumer columns each.
* **Grouped-query attention** (LLaMA-3, Qwen2, Mistral: ``num_key_value_heads < num_attention_heads``):
  one unit per *kv group*, i.e. a k/v head together with the ``q`` heads that read it
  (``head_dim · q-per-kv`` consumer columns). We chose this over pruning query heads inside the kv
  groups because (1) Hugging Face's attention kernels need the same number of query heads per kv
  head in a layer (``num_key_value_groups`` is one integer; ``repeat_kv`` / SDPA's ``enable_gqa``), so
  free query-head removal is not representable, and "the same number of query heads removed from
  every kv group" is a coupled constraint that no longer is a plain subset-selection problem (the
  exact and greedy methods and their proofs would not apply); (2) removing a kv group also shrinks
  ``k_proj`` / ``v_proj`` and the KV cache, which is where GQA models spend their decode memory; (3)
  the pruned layer stays a standard GQA layer (same ``num_key_value_groups``, same ``head_dim``), so
  a uniform result loads with the stock ``from_pretrained``. The price is granularity: a layer of
  LLaMA-3-8B has 8 kv groups of 4 query heads.
* **MLP neurons**: one unit per intermediate channel (gated MLPs slice ``gate_proj`` and ``up_proj``
  rows together, then ``down_proj`` columns).

Saving and loading
------------------
A Hugging Face config has one head count and one intermediate size for all layers. After pruning
the config always carries ``mipprune_layer_sizes`` = ``{"units": {site: kept units}, "consumer_bias":
[consumers given a bias by pruning (FLAP's compensation)], "from_pretrained": bool}``, and when every
layer keeps the same widths *and* the family's config can express them (LLaMA-family heads via
``num_attention_heads`` / ``num_key_value_heads`` / an explicit ``head_dim``, and intermediate sizes;
OPT's ``ffn_dim``, GPT-2's ``n_inner``; OPT and GPT-2 derive ``head_dim`` from the hidden size, so
pruned heads cannot be expressed there) the standard fields are updated too and
``AutoModelForCausalLM.from_pretrained(folder)`` loads the model as it is. In every case
:func:`load_pruned` (``mipprune.load_pruned(folder)``) loads it: it builds the dense skeleton from
the config, cuts every site to its recorded size, and loads the saved weights (a missing or
unexpected tensor is an error, not a silent re-initialization).
"""
from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mipprune.pruning.transformer_sites import SIZES_FIELD, Site, _rows, check_keep
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["ADAPTERS", "SIZES_FIELD", "LlamaFamilyAdapter", "OPTAdapter", "GPT2Adapter", "record_sizes",
           "load_pruned"]



# ----------------------------------------------------------------------------------- surgery helpers
def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _unit_index(keep: np.ndarray, per_unit: int, offset: int = 0) -> torch.Tensor:
    """Row / column indices of the kept units, ``per_unit`` consecutive ones each."""
    keep = torch.as_tensor(np.asarray(keep, dtype=np.int64))
    return (offset + keep[:, None] * per_unit + torch.arange(per_unit)[None, :]).reshape(-1)



def _slice_rows(root: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Replace Linear ``name`` by one with only the output rows ``rows``."""
    lin = root.get_submodule(name)
    new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(_rows(lin.weight, rows, 0))
        if lin.bias is not None:
            new.bias.copy_(_rows(lin.bias, rows, 0))
    new.train(lin.training)
    _set_module(root, name, new)


def _slice_cols(root: nn.Module, name: str, cols: torch.Tensor, weight, bias) -> None:
    """Replace Linear ``name`` by one reading only the input columns ``cols``; ``weight`` (kept
    columns, out) in the bridge layout or ``None`` (the old columns); ``bias`` (out,) or ``None``."""
    lin = root.get_submodule(name)
    has_bias = lin.bias is not None or bias is not None
    new = nn.Linear(len(cols), lin.out_features, bias=has_bias, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        if weight is None:
            new.weight.copy_(_rows(lin.weight, cols, 1))
        else:
            w = np.asarray(weight, dtype=np.float64)
            if w.shape != (len(cols), lin.out_features):
                raise InvalidInputError(f"weight of consumer {name!r} must have shape ({len(cols)}, "
                                        f"{lin.out_features}) (kept columns, outputs); got {w.shape}")
            new.weight.copy_(torch.from_numpy(w.T.copy()).to(new.weight))
        if bias is not None:
            b = np.asarray(bias, dtype=np.float64).reshape(-1)
            if b.shape != (lin.out_features,):
                raise InvalidInputError(f"bias of consumer {name!r} must have shape ({lin.out_features},); got {b.shape}")
            new.bias.copy_(torch.from_numpy(b).to(new.bias))
        elif lin.bias is not None:
            new.bias.copy_(lin.bias)
    new.train(lin.training)
    _set_module(root, name, new)


def _is_hf(model: nn.Module, model_types: tuple[str, ...]) -> bool:
    cfg = getattr(model, "config", None)
    # any class of the MRO: a pruned model is re-classed as a subclass (mipprune.pruning.hf_pruned)
    return (any(c.__module__.startswith("transformers.") for c in type(model).__mro__) and cfg is not None
            and getattr(cfg, "model_type", None) in model_types)


def _find_layers(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.ModuleList] | None:
    for path in paths:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path, mod
    return None


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


# --------------------------------------------------------------------------- LLaMA / Qwen2 / Mistral
class LlamaFamilyAdapter:
    """LLaMA, Qwen2 and Mistral (``*ForCausalLM`` and the bare ``*Model``): ``self_attn.{q,k,v,o}_proj``
    and a gated ``mlp.{gate,up,down}_proj`` per decoder layer. Attention units are heads, or kv groups
    under grouped-query attention (see the module docstring)."""

    family = "llama"
    model_types = ("llama", "qwen2", "mistral")

    def _layers(self, model):
        return _find_layers(model, ("model.layers", "layers"))

    def matches(self, model: nn.Module) -> bool:
        return _is_hf(model, self.model_types) and self._layers(model) is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    def sites(self, prepared: nn.Module) -> list[Site]:
        prefix, layers = self._layers(prepared)
        out: list[Site] = []
        for i, layer in enumerate(layers):
            block = f"{prefix}.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            hd, qpk = int(attn.head_dim), int(attn.num_key_value_groups)
            h = attn.q_proj.in_features
            n_kv = attn.k_proj.out_features // hd
            qkv_bias = attn.q_proj.bias is not None
            name = f"{block}.self_attn"
            out.append(Site(
                kind="heads", name=name, block=block, consumer=f"{name}.o_proj", n_units=n_kv,
                unit_columns=qpk * hd, params_per_unit=(2 * qpk + 2) * hd * h + (qpk + 2) * hd * qkv_bias,
                flops_per_unit=partial(_llama_head_flops, hd=hd, qpk=qpk, h=h),
                apply=partial(_llama_heads_apply, name=name, hd=hd, qpk=qpk),
                info={"heads": n_kv * qpk, "kv_heads": n_kv, "head_dim": hd,
                      "unit": "kv group" if qpk > 1 else "head"},
                producer_weights=partial(_weights_of, names=[f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"])))
            mname = f"{block}.mlp"
            n = mlp.up_proj.out_features
            mlp_bias = mlp.up_proj.bias is not None
            out.append(Site(
                kind="neurons", name=mname, block=block, consumer=f"{mname}.down_proj", n_units=n, unit_columns=1,
                params_per_unit=3 * h + 2 * mlp_bias, flops_per_unit=partial(_const_flops, value=3 * h),
                apply=partial(_gated_mlp_apply, name=mname), info={"neurons": n, "unit": "neuron"},
                producer_weights=partial(_weights_of, names=[f"{mname}.gate_proj", f"{mname}.up_proj"])))
        return out

    def finish(self, prepared: nn.Module) -> nn.Module:
        cfg = prepared.config
        sites = self.sites(prepared)
        heads = [s for s in sites if s.kind == "heads"]
        mlps = [s for s in sites if s.kind == "neurons"]
        kv = _uniform([s.n_units for s in heads])
        inter = _uniform([s.n_units for s in mlps])
        ok = kv is not None and inter is not None
        if kv is not None:
            qpk, hd = heads[0].unit_columns // heads[0].info["head_dim"], heads[0].info["head_dim"]
            cfg.head_dim = hd  # explicit: the default hidden_size // num_attention_heads would change
            cfg.num_key_value_heads = kv
            cfg.num_attention_heads = kv * qpk
        if inter is not None:
            cfg.intermediate_size = inter
        record_sizes(prepared, sites, from_pretrained=ok)
        return prepared


def _llama_head_flops(T: int, *, hd: int, qpk: int, h: int) -> int:
    # q/k/v/o projections, plus q·k scores and the weighted sum of v over T positions (no causal halving)
    return (2 * qpk + 2) * hd * h + 2 * qpk * hd * int(T)


def _const_flops(T: int, *, value: int) -> int:
    return value


def _weights_of(prepared: nn.Module, *, names: list[str]) -> list[torch.Tensor]:
    return [prepared.get_submodule(n).weight.detach() for n in names]


def _llama_heads_apply(prepared, keep, weight, bias, *, name: str, hd: int, qpk: int) -> None:
    attn = prepared.get_submodule(name)
    n_kv = attn.k_proj.out_features // hd
    keep = check_keep(Site("heads", name, "", "", n_kv, qpk * hd, 0, _const_flops, None), keep)
    q_rows, kv_rows = _unit_index(keep, qpk * hd), _unit_index(keep, hd)
    _slice_rows(prepared, f"{name}.q_proj", q_rows)
    _slice_rows(prepared, f"{name}.k_proj", kv_rows)
    _slice_rows(prepared, f"{name}.v_proj", kv_rows)
    _slice_cols(prepared, f"{name}.o_proj", q_rows, weight, bias)


def _gated_mlp_apply(prepared, keep, weight, bias, *, name: str) -> None:
    mlp = prepared.get_submodule(name)
    keep = check_keep(Site("neurons", name, "", "", mlp.up_proj.out_features, 1, 0, _const_flops, None), keep)
    rows = _unit_index(keep, 1)
    _slice_rows(prepared, f"{name}.gate_proj", rows)
    _slice_rows(prepared, f"{name}.up_proj", rows)
    _slice_cols(prepared, f"{name}.down_proj", rows, weight, bias)


# ----------------------------------------------------------------------------------------------- OPT
class OPTAdapter:
    """OPT (``OPTForCausalLM`` / ``OPTModel``): ``self_attn.{q,k,v,out}_proj`` heads and ``fc1`` / ``fc2``
    neurons per decoder layer (the MLP site is named ``<layer>.fc1``: OPT has no MLP module)."""

    family = "opt"

    def _layers(self, model):
        return _find_layers(model, ("model.decoder.layers", "decoder.layers"))

    def matches(self, model: nn.Module) -> bool:
        return _is_hf(model, ("opt",)) and self._layers(model) is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    def sites(self, prepared: nn.Module) -> list[Site]:
        prefix, layers = self._layers(prepared)
        out = []
        for i, layer in enumerate(layers):
            block = f"{prefix}.{i}"
            attn = layer.self_attn
            hd, n_heads, h = int(attn.head_dim), int(attn.num_heads), attn.q_proj.in_features
            b = attn.q_proj.bias is not None
            name = f"{block}.self_attn"
            out.append(Site(
                kind="heads", name=name, block=block, consumer=f"{name}.out_proj", n_units=n_heads, unit_columns=hd,
                params_per_unit=4 * hd * h + 3 * hd * b,
                flops_per_unit=partial(_llama_head_flops, hd=hd, qpk=1, h=h),
                apply=partial(_mha_apply, name=name, hd=hd, qkv=("q_proj", "k_proj", "v_proj"), out="out_proj"),
                info={"heads": n_heads, "head_dim": hd, "unit": "head"},
                producer_weights=partial(_weights_of, names=[f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"])))
            n = layer.fc1.out_features
            out.append(Site(
                kind="neurons", name=f"{block}.fc1", block=block, consumer=f"{block}.fc2", n_units=n, unit_columns=1,
                params_per_unit=2 * h + (layer.fc1.bias is not None), flops_per_unit=partial(_const_flops, value=2 * h),
                apply=partial(_mlp_apply, up=f"{block}.fc1", down=f"{block}.fc2"),
                info={"neurons": n, "unit": "neuron"}, producer_weights=partial(_weights_of, names=[f"{block}.fc1"])))
        return out

    def finish(self, prepared: nn.Module) -> nn.Module:
        _record_fixed_head_sizes(prepared, self.sites(prepared), prepared.config.num_attention_heads, "ffn_dim")
        return prepared


def _mha_apply(prepared, keep, weight, bias, *, name: str, hd: int, qkv: tuple[str, str, str], out: str) -> None:
    attn = prepared.get_submodule(name)
    n = getattr(attn, qkv[0]).out_features // hd
    keep = check_keep(Site("heads", name, "", "", n, hd, 0, _const_flops, None), keep)
    rows = _unit_index(keep, hd)
    for p in qkv:
        _slice_rows(prepared, f"{name}.{p}", rows)
    _slice_cols(prepared, f"{name}.{out}", rows, weight, bias)
    attn.num_heads = len(keep)


def _mlp_apply(prepared, keep, weight, bias, *, up: str, down: str) -> None:
    n = prepared.get_submodule(up).out_features
    keep = check_keep(Site("neurons", up, "", "", n, 1, 0, _const_flops, None), keep)
    rows = _unit_index(keep, 1)
    _slice_rows(prepared, up, rows)
    _slice_cols(prepared, down, rows, weight, bias)


# --------------------------------------------------------------------------------------------- GPT-2
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class GPT2Adapter:
    """GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``): the fused ``attn.c_attn`` (q | k | v rows per head) and
    ``attn.c_proj`` heads, ``mlp.c_fc`` / ``mlp.c_proj`` neurons. ``prepare`` swaps these ``Conv1D``
    (``x @ W + b``, ``W`` of shape (in, out)) for equivalent ``nn.Linear``; ``finish`` swaps them back, so
    the pruned model is a stock GPT-2 module tree."""

    family = "gpt2"

    def _layers(self, model):
        return _find_layers(model, ("transformer.h", "h"))

    def matches(self, model: nn.Module) -> bool:
        return _is_hf(model, ("gpt2",)) and self._layers(model) is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        prepared = copy.deepcopy(model)
        prefix, layers = self._layers(prepared)
        for i in range(len(layers)):
            for part in _GPT2_CONV1D:
                name = f"{prefix}.{i}.{part}"
                conv = prepared.get_submodule(name)
                if not isinstance(conv, Conv1D):
                    continue
                lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], device=conv.weight.device,
                                dtype=conv.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(conv.weight.T)
                    lin.bias.copy_(conv.bias)
                lin.train(conv.training)
                _set_module(prepared, name, lin)
        return prepared

    def sites(self, prepared: nn.Module) -> list[Site]:
        prefix, layers = self._layers(prepared)
        out = []
        for i, layer in enumerate(layers):
            block = f"{prefix}.{i}"
            attn = layer.attn
            if not isinstance(attn.c_attn, nn.Linear):
                raise UnsupportedLayerError(f"GPT-2 block {block!r} must be prepared (Conv1D → Linear) before "
                                            "listing its sites; got Conv1D")
            hd, n_heads, h = int(attn.head_dim), int(attn.num_heads), attn.c_attn.in_features
            name = f"{block}.attn"
            out.append(Site(
                kind="heads", name=name, block=block, consumer=f"{name}.c_proj", n_units=n_heads, unit_columns=hd,
                params_per_unit=4 * hd * h + 3 * hd, flops_per_unit=partial(_llama_head_flops, hd=hd, qpk=1, h=h),
                apply=partial(_gpt2_heads_apply, name=name, hd=hd),
                info={"heads": n_heads, "head_dim": hd, "unit": "head"},
                producer_weights=partial(_gpt2_qkv_weights, name=name)))
            mname = f"{block}.mlp"
            n = layer.mlp.c_fc.out_features
            out.append(Site(
                kind="neurons", name=mname, block=block, consumer=f"{mname}.c_proj", n_units=n, unit_columns=1,
                params_per_unit=2 * h + 1, flops_per_unit=partial(_const_flops, value=2 * h),
                apply=partial(_mlp_apply, up=f"{mname}.c_fc", down=f"{mname}.c_proj"),
                info={"neurons": n, "unit": "neuron"}, producer_weights=partial(_weights_of, names=[f"{mname}.c_fc"])))
        return out

    def finish(self, prepared: nn.Module) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        _record_fixed_head_sizes(prepared, self.sites(prepared), prepared.config.n_head, "n_inner")
        prefix, layers = self._layers(prepared)
        for i in range(len(layers)):
            for part in _GPT2_CONV1D:
                name = f"{prefix}.{i}.{part}"
                lin = prepared.get_submodule(name)
                if not isinstance(lin, nn.Linear):
                    continue
                conv = Conv1D(lin.out_features, lin.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(lin.weight.T)
                    conv.bias.copy_(lin.bias)
                conv.train(lin.training)
                _set_module(prepared, name, conv)
        return prepared


def _gpt2_qkv_weights(prepared: nn.Module, *, name: str) -> list[torch.Tensor]:
    w = prepared.get_submodule(f"{name}.c_attn").weight.detach()
    return list(w.chunk(3, dim=0))


def _gpt2_heads_apply(prepared, keep, weight, bias, *, name: str, hd: int) -> None:
    attn = prepared.get_submodule(name)
    width = attn.c_attn.out_features // 3
    keep = check_keep(Site("heads", name, "", "", width // hd, hd, 0, _const_flops, None), keep)
    rows = _unit_index(keep, hd)
    _slice_rows(prepared, f"{name}.c_attn", torch.cat([rows, rows + width, rows + 2 * width]))
    _slice_cols(prepared, f"{name}.c_proj", rows, weight, bias)
    attn.num_heads = len(keep)
    attn.split_size = len(keep) * hd


ADAPTERS = [LlamaFamilyAdapter(), OPTAdapter(), GPT2Adapter()]


# ------------------------------------------------------------------------------------ saving / loading
def _record_fixed_head_sizes(prepared: nn.Module, sites: list[Site], n_heads: int, inter_field: str) -> None:
    """OPT / GPT-2: their configs derive ``head_dim`` from the hidden size, so only a model that kept every
    head (and one MLP width, written to ``inter_field``) is rebuilt by the stock ``from_pretrained``."""
    heads_whole = all(s.n_units == n_heads for s in sites if s.kind == "heads")
    inter = _uniform([s.n_units for s in sites if s.kind == "neurons"])
    if inter is not None:
        setattr(prepared.config, inter_field, inter)
    record_sizes(prepared, sites, from_pretrained=heads_whole and inter is not None)


def record_sizes(prepared: nn.Module, sites: list[Site], *, from_pretrained: bool | None = None) -> None:
    """Write ``mipprune_layer_sizes`` into ``prepared.config`` (when it has a Hugging Face config):
    the kept units per site, the consumers that carry a bias, and whether the stock
    ``from_pretrained`` can rebuild the model from the config's own fields."""
    cfg = getattr(prepared, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    biased = [s.consumer for s in sites if prepared.get_submodule(s.consumer).bias is not None]
    setattr(cfg, SIZES_FIELD, {"units": {s.name: int(s.n_units) for s in sites}, "consumer_bias": biased,
                               "from_pretrained": from_pretrained})
    if not from_pretrained:
        _make_remote_loadable(prepared)


def _auto_class_of(name: str) -> str:
    for suffix, auto in (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForMaskedLM", "AutoModelForMaskedLM"),
                         ("ForTokenClassification", "AutoModelForTokenClassification")):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def _make_remote_loadable(model: nn.Module) -> None:
    """Re-class a Hugging Face model with per-layer widths as ``Mippruned<Class>`` (same layout) and register
    it for its auto class, so ``save_pretrained`` writes the loader beside the weights and
    ``AutoModel….from_pretrained(folder, trust_remote_code=True)`` rebuilds it (:mod:`mipprune.pruning.hf_pruned`)."""
    import transformers

    from mipprune.pruning.hf_pruned import base_class_name, pruned_class

    base = getattr(transformers, base_class_name(type(model).__name__), None)
    if not isinstance(base, type) or not isinstance(model, base):
        return  # not a transformers class (e.g. a user's subclass): mipprune.load_pruned still loads it
    cls = pruned_class(base)
    model.__class__ = cls
    cls.register_for_auto_class(_auto_class_of(base.__name__))



def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise InvalidInputError(f"folder must hold model.safetensors (or a sharded index) written by save_pretrained; "
                            f"got none in {str(folder)!r}")


def load_pruned(folder, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved by ``pruned.save_pretrained(folder)`` after mipprune pruned it.

    Works for every pruned width pattern (per-layer head and neuron counts from the config's
    ``mipprune_layer_sizes``); a folder without that field (a dense or a uniformly pruned model that
    the stock loader handles) is loaded with ``from_pretrained`` of the class in ``config.architectures``
    (``from_pretrained_kwargs`` are passed there). Returns the model in eval mode, with the dtype of
    the saved weights.
    """
    import transformers
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"folder must be a Hugging Face model folder with config.json; got {str(folder)!r}")
    from mipprune.pruning.hf_pruned import base_class_name, pruned_class

    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, base_class_name(arch), None) if arch else None
    if cls is None:
        raise InvalidInputError(f"config.architectures must name a transformers model class; got {arch!r}")
    sizes = getattr(config, SIZES_FIELD, None)
    if not sizes or sizes.get("from_pretrained"):
        return cls.from_pretrained(folder, **from_pretrained_kwargs).eval()
    model = pruned_class(cls)(config)  # the dense skeleton, cut to the recorded sizes by its __init__
    pruned_class(cls).register_for_auto_class(_auto_class_of(cls.__name__))
    state = _read_state(folder)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise InvalidInputError(f"saved weights must match the recorded sizes; got unexpected tensors {unexpected[:5]}")
    if missing:
        model.tie_weights()
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
        untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
        if untied:
            raise InvalidInputError(f"saved weights must include every tensor of the model; got none for {untied[:5]}")
    return model.eval()
