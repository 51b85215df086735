"""Prune a whole model over its channel groups: calibrate, select jointly per group, reconstruct.

:func:`prune_by_groups` is the group-level driver behind ``ChannelSelector(groups="graph")``:

1. :func:`~mipprune.pruning.channel_graph.build_channel_graph` finds the groups;
2. for each prunable group in forward order of its first producer, the statistics of all its
   consumers are captured (one layer at a time is never held beyond the group), the joint problem
   (:func:`~mipprune.pruning.joint.group_problem`) is solved by :func:`solvers.select_channels`,
   every consumer is refitted by least squares, and the group is cut
   (:func:`~mipprune.pruning.group_surgery.prune_groups`).

With ``sequential=True`` (He et al.) a group's consumers see inputs ``Z`` from the model pruned so
far while their targets ``Y`` come from the dense model (restricted to the output channels the
layer still has), so later refits absorb earlier errors; ``False`` captures everything once on the
dense model and cuts all groups at the end, each consumer refitted on its final kept columns.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mipprune.pruning.bridge import capture
from mipprune.pruning.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph
from mipprune.pruning.group_surgery import channel_keeps, prune_groups
from mipprune.pruning.joint import DEFAULT_RIDGE, group_problem, refit_consumers, ridge_of
from solvers.errors import InvalidInputError
from solvers.result import SelectionResult
from solvers.selection.problem import SelectionProblem

__all__ = ["GroupPruning", "prune_by_groups", "group_targets", "group_curves", "statistics_bytes", "DEFAULT_MAX_MEMORY"]


@dataclass
class GroupPruning:
    """Outcome of :func:`prune_by_groups`.

    Attributes
    ----------
    model : nn.Module — the pruned, reconstructed copy.
    graph : ChannelGraph — the dense model's groups.
    masks : {group name: bool array (n_units,)} — kept units of every prunable group.
    results : {group name: SelectionResult} — the pruned groups' selections (joint problems).
    rows : {group name: dict} — consumer errors, capture time, samples, joint problem size.
    skipped : {group name: reason} — groups left whole because their statistics exceed max_memory.
    memory : {group name: bytes} — the estimated peak of each group's statistics.
    """

    model: nn.Module
    graph: ChannelGraph
    masks: dict[str, np.ndarray]
    results: dict[str, SelectionResult]
    rows: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


def group_targets(groups: list[ChannelGroup], *, sparsity: float | None = None,
                  k: Mapping[str, int] | None = None) -> dict[str, int]:
    """Units to keep per group name: ``round(n·(1 − sparsity))`` (at least 1), or ``k`` by group name or
    by the name of any producer / consumer of the group."""
    if sparsity is not None:
        return {g.name: max(1, math.floor(g.n_units * (1.0 - sparsity) + 0.5)) for g in groups}
    out: dict[str, int] = {}
    for name, v in (k or {}).items():
        hits = [g for g in groups if g.name == name or any(m.module == name and m.role in ("producer", "consumer")
                                                           for m in g.members)]
        hits = [g for g in hits if g.name == name] or [g for g in hits if any(
            m.module == name and m.role == "producer" for m in g.members)] or hits
        if len(hits) != 1:
            raise InvalidInputError(f"k keys must name one prunable group (its name or a producer); got {name!r} "
                                    f"({len(hits)} groups match; groups: {[g.name for g in groups]})")
        g = hits[0]
        if not 1 <= v <= g.n_units:
            raise InvalidInputError(f"k[{name!r}] must satisfy 1 <= k <= {g.n_units} (units of group {g.name!r}); "
                                    f"got {v}")
        out[g.name] = int(v)
    return out


DEFAULT_MAX_MEMORY = 4 * 2**30  # bytes of float64 statistics per group (consumers' Grams + the joint problem)


def statistics_bytes(model: nn.Module, group: ChannelGroup) -> int:
    """Peak bytes of a group's float64 statistics, known before any allocation: every consumer's
    ``G`` (d×d) and ``B`` (d×m) while capturing, two d×d working copies of the largest consumer (its
    refit), and the joint problem (its ``G`` with two transient copies, ``B`` and current weights)."""
    mods = dict(model.named_modules())
    per_consumer, largest, d_joint, m_joint = 0, 0, 0, 0
    for m in group.consumers:
        mod = mods[m.module]
        d = m.units.size * m.columns_per_channel
        out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        per_consumer += d * d + d * out
        largest = max(largest, 2 * d * d)
        d_joint += int((m.units >= 0).sum()) * m.columns_per_channel
        m_joint += out
    return 8 * (per_consumer + largest + 3 * d_joint * d_joint + 3 * d_joint * m_joint)


def group_curves(model: nn.Module, data: Iterable, graph: ChannelGraph, *, positions: int = 10,
                 max_samples: int | None = None, seed: int = 0, max_memory: int | None = DEFAULT_MAX_MEMORY,
                 on_step=None) -> dict[str, np.ndarray]:
    """Error curve (n_units,) of every prunable group, on the dense model: the forward-greedy refit
    error of its joint problem for ``k = 1 … n`` (:func:`mipprune.pruning.budget.error_curve`).

    One group's statistics at a time (the memory cap applies per group); a group above
    ``max_memory`` gets ``inf`` below full width, so that a budget never relies on cutting it."""
    from mipprune.pruning.budget import error_curve

    curves = {}
    for g in graph.prunable:
        if on_step is not None:
            on_step(f"error curve of {g.name}")
        if max_memory is not None and statistics_bytes(model, g) > max_memory:
            curves[g.name] = np.r_[np.full(g.n_units - 1, np.inf), 0.0]
            continue
        stats = capture(model, data, [m.module for m in g.consumers], positions=positions, max_samples=max_samples,
                        columns_per_channel={m.module: m.columns_per_channel for m in g.consumers}, seed=seed)
        curves[g.name] = error_curve(group_problem(g, stats))
    return curves


def _select(problem: SelectionProblem, k: int, method: str, backend, time_limit, seed, gap) -> SelectionResult:
    from solvers.selection.select import select_channels

    kw = {"gap": gap} if gap is not None else {}
    return select_channels(problem, k=k, method=method, backend=backend, time_limit=time_limit, seed=seed, **kw)


def prune_by_groups(model: nn.Module, data: Iterable, example: torch.Tensor, targets: Mapping[str, int], *,
                    method: str = "lasso", sequential: bool = True, backend: str | None = None,
                    time_limit: float | None = None, gap: float | None = None, positions: int = 10,
                    max_samples: int | None = None, seed: int = 0, graph: ChannelGraph | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, on_step=None) -> GroupPruning:
    """Prune every group named in ``targets`` ({group name: units to keep}) of ``model`` (not modified).

    ``data``: a re-iterable of calibration batches; ``example``: one batch for tracing and checks.
    ``on_step(message)`` is called before each capture and selection (for progress bars).
    ``max_memory``: bytes that one group's statistics may take (:func:`statistics_bytes`, estimated
    before anything is allocated); a group above it stays whole and ``skipped`` in the result says
    why (``None``: no cap). With ``sequential=False`` all groups' statistics live at once and the cap
    applies to their sum.
    """
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, np.integer))
                                   or max_memory < 1):
        raise InvalidInputError(f"max_memory must be a number of bytes >= 1 or None; got {max_memory!r}")
    graph = graph or build_channel_graph(model, example)
    by_name = {g.name: g for g in graph.prunable}
    for name in targets:
        if name not in by_name:
            raise InvalidInputError(f"targets must name prunable groups {sorted(by_name)}; got {name!r}")
    todo = [g for g in graph.prunable if g.name in targets and targets[g.name] < g.n_units]
    skipped: dict[str, str] = {}
    memory = {g.name: statistics_bytes(model, g) for g in todo}
    if max_memory is not None:
        kept, total = [], 0
        for g in todo:
            need = memory[g.name] if sequential else total + memory[g.name]
            if need > max_memory:
                skipped[g.name] = (f"statistics need {memory[g.name] / 2**30:.2f} GiB"
                                   f"{'' if sequential else f' ({need / 2**30:.2f} GiB with the groups before)'}"
                                   f" > max_memory {max_memory / 2**30:.2f} GiB")
                continue
            kept.append(g)
            total += memory[g.name]
        todo = kept
    step = on_step or (lambda _msg: None)
    masks = {g.name: np.ones(g.n_units, dtype=bool) for g in graph.prunable}
    results: dict[str, SelectionResult] = {}
    rows: dict[str, dict] = {}
    if not sequential:
        step(f"calibrating {sum(len(g.consumers) for g in todo)} consumers")
        t0 = time.perf_counter()
        names = list(dict.fromkeys(m.module for g in todo for m in g.consumers))
        cols = {m.module: m.columns_per_channel for g in todo for m in g.consumers}
        stats = capture(model, data, names, positions=positions, max_samples=max_samples,
                        columns_per_channel=cols, seed=seed) if names else {}
        capture_time = time.perf_counter() - t0
        for g in todo:
            step(f"selecting {g.name} ({method})")
            problem = group_problem(g, stats)
            res = _select(problem, targets[g.name], method, backend, time_limit, seed, gap)
            results[g.name], masks[g.name] = res, res.mask.copy()
            _, errors = refit_consumers(g, res.mask, stats)
            rows[g.name] = {"consumer_errors": errors, "capture_time": capture_time,
                            "error_no_refit": problem.error(res.mask, refit=False),
                            "n_samples": {n: int(stats[n].n_samples) for n in errors},
                            "consumer_columns": {n: int(stats[n].gram.shape[0]) for n in errors},
                            "columns": problem.n_columns, "memory": memory[g.name]}
        # final refit of every consumer on its kept columns across all groups
        id_masks = {g.id: masks[g.name] for g in todo}
        keeps = channel_keeps(graph, id_masks)
        weights = {}
        for n in names:
            st = stats[n]
            keep = keeps.get((n, "in"), np.ones(int(st.groups.max()) + 1, dtype=bool))
            problem = SelectionProblem(st.gram, st.cross, max(st.target_sq, 1e-300), st.groups, weights=st.weights)
            weights[n] = problem.refit(keep, ridge=ridge_of(st.gram, DEFAULT_RIDGE))
        pruned = prune_groups(model, graph, id_masks, weights, example) if todo else copy.deepcopy(model)
        return GroupPruning(model=pruned, graph=graph, masks=masks, results=results, rows=rows,
                            skipped=skipped, memory=memory)

    current, current_graph = model, graph
    out_index: dict[str, np.ndarray] = {}  # module → dense output channels it still has
    for g0 in todo:
        g = next(x for x in current_graph.groups if x.name == g0.name)
        names = [m.module for m in g.consumers]
        step(f"calibrating {g.name} ({len(names)} consumers)")
        t0 = time.perf_counter()
        stats = capture(current, data, names, positions=positions, max_samples=max_samples,
                        target=model if current is not model else None,
                        columns_per_channel={m.module: m.columns_per_channel for m in g.consumers}, seed=seed,
                        target_channels={n: out_index[n] for n in names if n in out_index})
        capture_time = time.perf_counter() - t0
        step(f"selecting {g.name} ({method})")
        problem = group_problem(g, stats)
        res = _select(problem, targets[g.name], method, backend, time_limit, seed, gap)
        weights, errors = refit_consumers(g, res.mask, stats)
        results[g.name], masks[g.name] = res, res.mask.copy()
        rows[g.name] = {"consumer_errors": errors, "capture_time": capture_time,
                        "error_no_refit": problem.error(res.mask, refit=False),
                        "n_samples": {n: int(stats[n].n_samples) for n in names}, "columns": problem.n_columns,
                        "consumer_columns": {n: int(stats[n].gram.shape[0]) for n in names},
                        "memory": memory[g.name]}
        for (name, side), keep in channel_keeps(current_graph, {g.id: res.mask}).items():
            if side == "out":
                out_index[name] = out_index.get(name, np.arange(keep.size))[keep]
        current = prune_groups(current, current_graph, {g.id: res.mask}, weights, example)
        current_graph = build_channel_graph(current, example)
    if current is model:
        current = copy.deepcopy(model)
    return GroupPruning(model=current, graph=graph, masks=masks, results=results, rows=rows, skipped=skipped,
                        memory=memory)
