"""Surgery over channel groups: remove the unkept units of every group from a copy of a model.

For each group of a :class:`~mipprune.pruning.channel_graph.ChannelGraph` and its keep mask over
units, every member is sliced: producers lose output rows (weight, bias), BatchNorms their
features (affine parameters and running statistics), depthwise / grouped convolutions whole
convolution groups (weight rows, ``groups``, channel counts), consumers their input columns. A
consumer reading several groups (a concat) is sliced by each. Reconstructed consumer weights (bridge
layout ``(kept columns, outputs)``) are written before the outputs are sliced, so a layer that is
both consumer and producer takes weights fitted on its full outputs.
"""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from mipprune.pruning.channel_graph import ChannelGraph, ChannelGroup
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["channel_keeps", "check_keep", "prune_groups"]


def check_keep(what: str, mask, n: int, unit: str = "channel") -> np.ndarray:
    """``mask`` as a bool array (n,) keeping at least one ``unit``, else InvalidInputError about ``what``."""
    m = np.asarray(mask)
    if m.shape != (n,):
        raise InvalidInputError(f"{what} must have shape ({n},) (one per {unit}); got {m.shape}")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise InvalidInputError(f"{what} must be boolean (or 0/1); got values {np.unique(m)[:5]}")
        m = m.astype(bool)
    if not m.any():
        raise InvalidInputError(f"{what} must keep at least one {unit}; got all False")
    return m


def _check_mask(group: ChannelGroup, mask) -> np.ndarray:
    m = check_keep(f"mask of group {group.name!r}", mask, group.n_units, "unit")
    if group.fixed and not m.all():
        raise InvalidInputError(f"group {group.name!r} must stay whole ({'; '.join(group.fixed)}); got a mask "
                                f"dropping {int((~m).sum())} units")
    return m


def channel_keeps(graph: ChannelGraph, masks: Mapping[int, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Kept channels per (module, side) from per-group unit masks (checked: sizes, fixed groups).

    ``side`` is ``"out"`` (producer rows, BatchNorm features, grouped conv outputs) or ``"in"``
    (consumer input channels, grouped conv inputs). Groups not in ``masks`` keep everything.
    """
    by_id = {g.id: g for g in graph.groups}
    checked = {}
    for gid, mask in masks.items():
        if gid not in by_id:
            raise InvalidInputError(f"masks must be keyed by group ids {sorted(by_id)}; got {gid!r}")
        checked[gid] = _check_mask(by_id[gid], mask)
    return graph.kept_channels(checked)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.detach().clone())


def _idx(keep: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(keep), dtype=torch.long, device=device)


def _slice_in(name: str, module: nn.Module, keep: np.ndarray, weights) -> None:
    """Consumer: input channels ``keep``; ``weights`` (kept columns × outputs, bridge layout) or None."""
    w = module.weight.detach()
    out = w.shape[0]
    if isinstance(module, nn.Conv2d):
        cols = np.repeat(keep, module.kernel_size[0] * module.kernel_size[1])
    else:
        cols = np.repeat(keep, module.in_features // keep.size)
    if weights is None:
        new = w.reshape(out, -1)[:, _idx(cols, w.device)]
    else:
        arr = np.asarray(weights, dtype=np.float64)
        if arr.shape == (cols.size, out):
            arr = arr[cols]
        if arr.shape != (int(cols.sum()), out):
            raise InvalidInputError(f"weights of {name!r} must have shape ({int(cols.sum())}, {out}) (kept columns "
                                    f"× outputs) or ({cols.size}, {out}); got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"weights of {name!r} must be finite; got NaN or inf entries")
        new = torch.as_tensor(arr.T.copy(), dtype=w.dtype, device=w.device)
    if isinstance(module, nn.Conv2d):
        _set(module, "weight", new.reshape(out, int(keep.sum()), *module.kernel_size))
        module.in_channels = int(keep.sum())
    else:
        _set(module, "weight", new.reshape(out, -1))
        module.in_features = int(new.shape[1])


def _slice_out(module: nn.Module, keep: np.ndarray) -> None:
    idx = _idx(keep, module.weight.device)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, attr)
            if t is not None:
                _set(module, attr, t.detach()[idx])
        module.num_features = int(keep.sum())
        return
    _set(module, "weight", module.weight.detach()[idx])
    if module.bias is not None:
        _set(module, "bias", module.bias.detach()[idx])
    if isinstance(module, nn.Conv2d):
        module.out_channels = int(keep.sum())
    else:
        module.out_features = int(keep.sum())


def prune_groups(model: nn.Module, graph: ChannelGraph, masks: Mapping[int, np.ndarray],
                 weights: Mapping[str, np.ndarray] | None = None,
                 example_input: torch.Tensor | None = None) -> nn.Module:
    """A pruned deep copy of ``model`` (``model`` itself is never modified).

    Parameters
    ----------
    graph : ChannelGraph
        ``build_channel_graph(model, example_input)``.
    masks : {group id: bool array (n_units,)}
        Units to keep; fixed groups must keep all; groups not named stay whole.
    weights : {consumer name: array (kept columns, outputs)}, optional
        Reconstructed consumer weights in the bridge layout (``(all columns, outputs)`` also
        accepted: rows of removed columns are ignored). Consumers not named keep their own
        weights on the kept columns.
    example_input : tensor, optional
        Run the pruned copy once on it to check that it works.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    keeps = channel_keeps(graph, masks)
    weights = dict(weights or {})
    consumers = {k[0] for k in keeps if k[1] == "in"}
    for name in weights:
        if name not in {m.module for g in graph.groups for m in g.consumers}:
            raise InvalidInputError(f"weights must be keyed by consumer layers; got {name!r}")
    pruned = copy.deepcopy(model)
    mods = dict(pruned.named_modules())
    grouped = {m.module for g in graph.groups for m in g.members if m.role == "grouped"}
    # consumers first (weights fitted on full outputs), then every output side
    for name in sorted(consumers | set(weights), key=graph.layers.index if graph.layers else None):
        if name in grouped:
            continue
        mod = mods[name]
        keep = keeps.get((name, "in"))
        if keep is None:
            keep = np.ones(mod.in_channels if isinstance(mod, nn.Conv2d) else
                           next(m.units.size for g in graph.groups for m in g.consumers if m.module == name), bool)
        _slice_in(name, mod, keep, weights.get(name))
    for (name, side), keep in keeps.items():
        if side != "out" or keep.all():
            continue
        mod = mods[name]
        if name in grouped:
            per = mod.in_channels // mod.groups
            _slice_out(mod, keep)
            mod.in_channels = int(keep.sum())
            mod.groups = int(keep.sum()) // per
            continue
        _slice_out(mod, keep)
    if example_input is not None:
        with evaluation_mode(pruned):
            try:
                pruned(prepare_input(pruned, example_input))
            except Exception as exc:  # a dependency the analysis missed (e.g. a hard-coded size)
                raise UnsupportedLayerError(
                    f"pruned model must run on example_input; got {type(exc).__name__}: {exc}") from exc
    return pruned
