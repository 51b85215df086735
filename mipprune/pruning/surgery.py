"""Channel surgery: physically remove selected channels from a copy of a model.

For each consumer in the plan, its prune group (from :mod:`mipprune.pruning.graph`) says which producer and
BatchNorms carry those channels. The copy gets the producer's output rows and bias, the BatchNorm
parameters and running statistics, and the consumer's input columns sliced to the kept channels,
and the reconstructed consumer weights (from the bridge / solver, in the bridge layout) written in.
"""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from mipprune.pruning.graph import PruneGroup, find_prune_groups
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["prune_channels"]


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:  # a buffer
        setattr(module, name, value.detach().clone())


def _check_mask(name: str, mask, n_channels: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != (n_channels,):
        raise InvalidInputError(f"mask of {name!r} must have shape ({n_channels},) (one per channel); got {m.shape}")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise InvalidInputError(f"mask of {name!r} must be boolean (or 0/1); got values {np.unique(m)[:5]}")
        m = m.astype(bool)
    if not m.any():
        raise InvalidInputError(f"mask of {name!r} must keep at least one channel; got all False")
    return m


def _new_weight(name: str, module: nn.Module, group: PruneGroup, mask: np.ndarray, weights) -> torch.Tensor:
    """The consumer's weight tensor on the kept input channels (output dim still full)."""
    w = module.weight.detach()
    cols = np.repeat(mask, group.columns_per_channel)  # kept columns, bridge layout rows
    d, m = int(cols.size), w.shape[0]
    kept = int(cols.sum())
    if weights is None:
        full = w.reshape(m, d)
        new = full[:, torch.as_tensor(np.flatnonzero(cols), device=w.device)]
    else:
        arr = np.asarray(weights, dtype=np.float64)
        if arr.shape == (d, m):
            arr = arr[cols]
        elif arr.shape != (kept, m):
            raise InvalidInputError(
                f"weights of {name!r} must have shape ({kept}, {m}) (kept columns × outputs) or ({d}, {m}); "
                f"got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"weights of {name!r} must be finite; got NaN or inf entries")
        new = torch.as_tensor(arr.T, dtype=w.dtype, device=w.device)
    if isinstance(module, nn.Conv2d):
        return new.reshape(m, int(mask.sum()), *module.kernel_size)
    return new.reshape(m, kept)


def _slice_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    _set_param(module, "weight", module.weight.detach()[keep])
    if module.bias is not None:
        _set_param(module, "bias", module.bias.detach()[keep])
    if isinstance(module, nn.Conv2d):
        module.out_channels = int(keep.numel())
    else:
        module.out_features = int(keep.numel())


def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, attr)
        if t is not None:
            _set_param(bn, attr, t.detach()[keep.to(t.device)])
    bn.num_features = int(keep.numel())


def prune_channels(model: nn.Module, plan: Mapping[str, tuple], example_input: torch.Tensor | None = None
                   ) -> nn.Module:
    """A pruned deep copy of ``model``: for each consumer in ``plan``, its input channels reduced.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    plan : {consumer name: (mask, weights)}
        ``mask``: bool array (C,) over the consumer's input channels (= its producer's outputs),
        ``True`` = keep. ``weights``: new consumer weights in the bridge layout, either
        ``(d_kept, m)`` (kept columns only) or ``(d, m)`` (all columns; rows of dropped columns are
        ignored), with ``d = C·columns_per_channel`` and ``m`` the consumer's outputs; or ``None``
        to keep the old weights on the kept channels. Consumers must head a
        :class:`~mipprune.pruning.graph.PruneGroup`.
    example_input : tensor, optional
        A batch the model accepts. Makes the dependency analysis shape-checked, and the pruned copy
        is run on it once to check that it works.

    Returns
    -------
    nn.Module
        The copy, with producers' output channels (weight rows, bias), their BatchNorms (weight,
        bias, running mean and variance) and consumers' input channels sliced, and the given weights
        written in the model's dtype and device. Its mode (train/eval) is the model's.

    Raises
    ------
    InvalidInputError
        An unknown layer, a layer whose input channels cannot be pruned alone, a mask of the wrong
        length or keeping nothing, weights of the wrong shape.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(plan, Mapping):
        raise InvalidInputError(f"plan must be a dict {{consumer name: (mask, weights)}}; got {type(plan).__name__}")
    groups = {g.consumer: g for g in find_prune_groups(model, example_input)}
    modules = dict(model.named_modules())
    checked: dict[str, tuple[PruneGroup, np.ndarray, object]] = {}
    for name, entry in plan.items():
        if name not in modules or name == "":
            raise InvalidInputError(f"plan keys must be module names of the model; got {name!r} (no such module)")
        if name not in groups:
            raise InvalidInputError(
                f"plan key {name!r} must be a layer whose input channels can be pruned alone "
                f"(one of {sorted(groups)}); got a layer without such a group")
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise InvalidInputError(f"plan[{name!r}] must be a pair (mask, weights or None); got {entry!r:.80}")
        group = groups[name]
        mask = _check_mask(name, entry[0], group.n_channels)
        checked[name] = (group, mask, entry[1])

    pruned = copy.deepcopy(model)
    pmods = dict(pruned.named_modules())
    # consumers first, with the reconstructed weights for their full set of outputs; then the
    # producers' outputs, which may cut rows from a consumer's new weights (a layer can be both)
    for name, (group, mask, weights) in checked.items():
        consumer = pmods[name]
        new = _new_weight(name, consumer, group, mask, weights)
        _set_param(consumer, "weight", new)
        if isinstance(consumer, nn.Conv2d):
            consumer.in_channels = int(mask.sum())
        else:
            consumer.in_features = int(new.shape[1])
    for name, (group, mask, _) in checked.items():
        producer = pmods[group.producer]
        keep = torch.as_tensor(np.flatnonzero(mask), device=producer.weight.device)
        _slice_outputs(producer, keep)
        for bn in group.batchnorms:
            _slice_batchnorm(pmods[bn], keep)

    if example_input is not None:
        with evaluation_mode(pruned):
            try:
                pruned(prepare_input(pruned, example_input))
            except Exception as exc:  # pragma: no cover - a missed dependency; say so, loudly
                raise UnsupportedLayerError(
                    f"pruned model must run on example_input; got {type(exc).__name__}: {exc}") from exc
    return pruned
