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
from mipprune.pruning.group_surgery import _slice_in, _slice_out, check_keep
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["prune_channels"]


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
        mask = check_keep(f"mask of {name!r}", entry[0], group.n_channels)
        checked[name] = (group, mask, entry[1])

    pruned = copy.deepcopy(model)
    pmods = dict(pruned.named_modules())
    # consumers first, with the reconstructed weights for their full set of outputs; then the
    # producers' outputs, which may cut rows from a consumer's new weights (a layer can be both)
    for name, (group, mask, weights) in checked.items():
        _slice_in(name, pmods[name], mask, weights)
    for name, (group, mask, _) in checked.items():
        for module in [group.producer, *group.batchnorms]:
            _slice_out(pmods[module], mask)

    if example_input is not None:
        with evaluation_mode(pruned):
            try:
                pruned(prepare_input(pruned, example_input))
            except Exception as exc:  # pragma: no cover - a missed dependency; say so, loudly
                raise UnsupportedLayerError(
                    f"pruned model must run on example_input; got {type(exc).__name__}: {exc}") from exc
    return pruned
