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

Streamed calibration (``streamed=True``, the default; :mod:`mipprune.pruning.streaming`): a
capture runs from the activation cached at a cut of the fx trace (a node after which one tensor is
live, e.g. a ResNet block boundary) only up to the last consumer it needs. In the sequential driver
the cache holds the *pruned* model's activation, moved forward after each group to the latest cut
before the first member of any group still to do (valid because every module changed so far lies
after it). The dense targets ``Y`` are recorded once, up front, at exactly the rows each consumer's
later capture samples (:func:`~mipprune.pruning.streaming.record_target_rows`; the bridge seeds the
sampling per layer, so the dense and pruned layer draw the same positions), instead of a dense-model
cache advanced alongside: those rows (images × positions × outputs per consumer, ~0.5 GiB for
ResNet-50 at 224² and 512 images) are smaller than a second activation cache (up to 1.6 GiB there)
and cost one dense pass instead of a truncated dense run per group. The cache and the recorded rows
count against ``max_memory`` beside the group's statistics: a cache that does not fit is dropped
(captures run from the input, still truncated), rows that do not fit are not recorded (the dense
model runs beside, in full, per group). Models fx cannot trace, data that changes between passes
and the lean (one consumer at a time) plan use full forwards as before; results are the same either
way up to float rounding.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mipprune.pruning.bridge import capture
from mipprune.pruning.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph
from mipprune.pruning.group_surgery import channel_keeps, prune_groups
from mipprune.pruning.joint import DEFAULT_RIDGE, group_problem, refit_consumers, ridge_of
from mipprune.pruning.samples import capture_samples
from mipprune.pruning.streaming import CachedForward, record_target_rows, target_rows_bytes
from solvers.errors import InvalidInputError
from solvers.result import SelectionResult
from solvers.selection.problem import SelectionProblem

__all__ = ["GroupPruning", "prune_by_groups", "group_targets", "group_curves", "curve_calibration",
           "CURVE_IMAGES", "statistics_bytes",
           "lean_statistics_bytes", "calibration_rows", "DEFAULT_MAX_MEMORY"]


@dataclass
class GroupPruning:
    """Outcome of :func:`prune_by_groups`.

    Attributes
    ----------
    model : nn.Module — the pruned, reconstructed copy.
    graph : ChannelGraph — the dense model's groups.
    masks : {group name: bool array (n_units,)} — kept units of every prunable group.
    results : {group name: SelectionResult} — the pruned groups' selections (joint problems), without
        their joint weights (``weights`` is empty: every consumer's refitted weights are in ``model``,
        and holding the joint ones for every group cost 0.3 GB at ResNet-50's last stage).
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


def calibration_rows(model: nn.Module, data: Iterable, example: torch.Tensor, names: list[str], *,
                     positions: int | None, max_samples: int | None) -> dict[str, int]:
    """Rows of ``Z`` each layer will accumulate (images × sampled positions or tokens, capped by
    ``max_samples``), known before any capture: one forward of ``example[:1]`` for the output sizes."""
    from mipprune.torch_utils import evaluation_mode, prepare_input, split_batch

    mods = dict(model.named_modules())
    per_image: dict[str, int] = {}

    def hook(name):
        def record(_m, _i, out):
            if isinstance(mods[name], nn.Conv2d):
                hw = out.shape[-1] * out.shape[-2]
                per_image[name] = hw if positions is None else min(positions, hw)
            else:
                per_image[name] = out.numel() // out.shape[0] // out.shape[-1]
        return record

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with evaluation_mode(model), torch.no_grad():
            model(prepare_input(model, example[:1]))
    finally:
        for h in handles:
            h.remove()
    images = sum(len(split_batch(b)[0]) for b in data)
    return {n: min(images * per_image.get(n, 1), max_samples or np.iinfo(np.int64).max) for n in names}


def _shape_of(model: nn.Module, member) -> tuple[int, int]:
    mod = dict(model.named_modules())[member.module]
    d = member.units.size * member.columns_per_channel
    return d, (mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features)


def lean_statistics_bytes(model: nn.Module, group: ChannelGroup, rows: Mapping[str, int]) -> int:
    """Peak bytes of a group's statistics when its consumers are captured one after another, each as
    ``n×d`` samples when ``n < d`` (else its Gram), its block written into the joint problem and
    dropped, and refitted one at a time after the selection (recaptured): the joint ``G`` with a
    working copy, its ``B`` and weights, plus the largest single consumer (its rows or Gram, the
    Schur complement of other groups' columns, and its refit's Gram with two working copies)."""
    d_joint, m_joint, largest = 0, 0, 0
    for m in group.consumers:
        d, out = _shape_of(model, m)
        n = int(rows.get(m.module, d))
        a = int((m.units >= 0).sum()) * m.columns_per_channel
        f = d - a
        source = min(d * d + d * out, n * (d + out))
        schur = f * f + a * f + f * (a + out) if f else 0
        refit = source + 3 * d * d + 2 * d * out
        largest = max(largest, source + schur + a * a, refit)
        d_joint += a
        m_joint += out
    return 8 * (2 * d_joint * d_joint + 3 * d_joint * m_joint + largest)


def _one_at_a_time(model: nn.Module, data, group: ChannelGroup, rows: Mapping[str, int], *,
                   channels: Mapping[str, np.ndarray] | None = None, **common) -> "_OneAtATime":
    """The consumers of ``group`` captured on access, one at a time: rows when ``rows[name] < d``."""
    channels = dict(channels or {})
    cols = {m.module: m.columns_per_channel for m in group.consumers}

    def load(name):
        d = next(_shape_of(model, m)[0] for m in group.consumers if m.module == name)
        if rows[name] < d:
            return capture_samples(model, data, name, target_channels=channels, columns_per_channel=cols[name],
                                   **common)
        return capture(model, data, [name], columns_per_channel={name: cols[name]},
                       target_channels={name: channels[name]} if name in channels else None, **common)[name]

    return _OneAtATime([m.module for m in group.consumers], load)


class _OneAtATime(Mapping):
    """``{consumer: statistics}`` captured on access (nothing cached): rows (:func:`capture_samples`)
    when the layer sees fewer rows than it has columns, else its Gram (:func:`capture`)."""

    def __init__(self, names, load):
        self.names, self.load, self.seen = list(names), load, {}

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        src = self.load(name)
        self.seen[name] = (int(src.n_samples), int(src.weights.shape[0]), type(src).__name__)
        return src

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _advance_within(stream: CachedForward, target: int, allowance: int | None) -> None:
    """Move ``stream``'s cache to the latest cut at or before node ``target`` (and not before its current
    cut) whose estimated size fits ``allowance`` bytes; drop it when none does."""
    start = stream.cut if stream.cache is not None else 0
    fits = [c for c in stream.cuts if start <= c <= target
            and (allowance is None or stream.estimated_bytes(c) <= allowance)]
    if not fits:
        stream.drop()
    else:
        stream.advance(max(fits))


#: Images the budget's error curves calibrate on (the first batches covering them), with as many more
#: positions per image as keep the rows of a full calibration: the curves only rank widths, and a pass
#: over 512 images of ResNet-50 at 224² costs ~50 s on 2 cores, several of which the curves took.
CURVE_IMAGES = 128


class _FirstBatches:
    """The first ``n`` batches of a re-iterable ``data``, re-iterable itself."""

    def __init__(self, data: Iterable, n: int):
        self.data, self.n = data, n

    def __iter__(self):
        import itertools

        return itertools.islice(iter(self.data), self.n)


def curve_calibration(data: Iterable, positions: int | None, images: int | None = CURVE_IMAGES
                      ) -> tuple[Iterable, int | None, int, int]:
    """``(data, positions, images used, images in all)`` for the error curves: the first batches of
    ``data`` covering ``images`` images, and ``positions`` scaled by the images left out (so that the
    curves' problems see as many rows); ``data`` unchanged when it has no more than ``images``."""
    from mipprune.torch_utils import split_batch

    counts = [len(split_batch(b)[0]) for b in data]
    total = sum(counts)
    if images is None or positions is None or total <= images:
        return data, positions, total, total
    used, n = 0, 0
    while used < images:
        used += counts[n]
        n += 1
    return _FirstBatches(data, n), int(math.ceil(positions * total / used)), used, total


def group_curves(model: nn.Module, data: Iterable, graph: ChannelGraph, *, positions: int = 10,
                 max_samples: int | None = None, seed: int = 0, max_memory: int | None = DEFAULT_MAX_MEMORY,
                 on_step=None, streamed: bool = True) -> dict[str, np.ndarray]:
    """Error curve (n_units,) of every prunable group, on the dense model: the forward-greedy refit
    error of its joint problem for ``k = 1 … n`` (:func:`mipprune.pruning.budget.error_curve`).
    (Callers subsample the data first with :func:`curve_calibration`.)

    One group's statistics at a time (the memory cap applies per group; above it, its consumers one
    after another, as rows when they see fewer rows than columns); a group above ``max_memory`` even
    then gets ``inf`` below full width, so that a budget never relies on cutting it.

    ``streamed``: captures run from a cached activation of the dense model up to their last consumer
    (:class:`~mipprune.pruning.streaming.CachedForward`), the cache moved forward across passes and
    counted against ``max_memory`` beside the statistics of the groups captured together."""
    from mipprune.pruning.budget import error_curve
    from mipprune.torch_utils import split_batch

    curves = {}
    rows: dict[str, int] = {}
    pending: list[ChannelGroup] = []  # groups whose consumers are captured together, in one pass over data
    pending_bytes = 0
    stream = None
    prunable = graph.prunable
    if streamed and prunable:
        stream, _why = CachedForward.create(model, data, split_batch(next(iter(data)))[0][:1])
    if stream is not None:
        first_consumer = [stream.first_index({m.module for m in g.consumers}) for g in prunable]

    def flush(upcoming: int) -> None:
        nonlocal pending_bytes
        if not pending:
            return
        cpc = {m.module: m.columns_per_channel for x in pending for m in x.consumers}
        kw = {}
        if stream is not None:
            if max_memory is not None and stream.cache_bytes + pending_bytes > max_memory:
                stream.drop()
            kw["forward"] = stream.runner(stream.stop_index(cpc))
        stats = capture(model, data, list(cpc), positions=positions, max_samples=max_samples,
                        columns_per_channel=cpc, seed=seed, **kw)  # per-layer seeds: the same rows as one group alone
        for x in pending:
            curves[x.name] = error_curve(group_problem(x, {m.module: stats[m.module] for m in x.consumers}))
        pending.clear()
        pending_bytes = 0
        del stats
        if stream is not None and upcoming < len(prunable):
            # the dense model never changes: the cache may move up to the first consumer still to capture
            nxt = statistics_bytes(model, prunable[upcoming])
            _advance_within(stream, stream.cut_before(min(first_consumer[upcoming:])),
                            None if max_memory is None else max_memory - nxt)

    for position, g in enumerate(prunable):
        need = statistics_bytes(model, g)
        lean = max_memory is not None and need > max_memory
        if lean:
            if not rows:
                example = split_batch(next(iter(data)))[0][:1]
                rows = calibration_rows(model, data, example, list(dict.fromkeys(
                    m.module for x in graph.prunable for m in x.consumers)), positions=positions,
                    max_samples=max_samples)
            need = lean_statistics_bytes(model, g, rows)
        if on_step is not None:
            on_step(f"error curve of {g.name} (statistics ≈ {need / 2**20:.1f} MiB"
                    f"{', one consumer at a time' if lean else ''})")
        if max_memory is not None and need > max_memory:
            curves[g.name] = np.r_[np.full(g.n_units - 1, np.inf), 0.0]
            continue
        if lean:
            stats = _one_at_a_time(model, data, g, rows, positions=positions, max_samples=max_samples, seed=seed)
            curves[g.name] = error_curve(group_problem(g, stats))
            continue
        # Several groups per forward pass while their estimates fit the cap together: a capture costs a
        # whole pass over the calibration set, the dominant cost on large inputs (ResNet-50 at 224²).
        if pending and max_memory is not None and pending_bytes + need > max_memory:
            flush(position)
        pending.append(g)
        pending_bytes += need
    flush(len(prunable))
    return {g.name: curves[g.name] for g in graph.prunable if g.name in curves}


def _without_weights(res: SelectionResult) -> SelectionResult:
    """``res`` with an empty ``weights`` (see :class:`GroupPruning`)."""
    return dataclasses.replace(res, weights=np.zeros((0, 0)))


def _select(problem: SelectionProblem, k: int, method: str, backend, time_limit, seed, gap, *, model: nn.Module,
            group: ChannelGroup, data, options=None) -> SelectionResult:
    """A solver method on the joint problem, or a criterion's top-k units refitted on it."""
    from mipprune.pruning.criteria import CRITERIA, group_scores
    from solvers.selection.baselines import select_by_scores
    from solvers.selection.select import select_channels

    if method in CRITERIA:
        start = time.perf_counter()
        scores = group_scores(method, model, group, data, k=k)
        return select_by_scores(problem, scores, k, method=method, start=start, info={"scores": scores})
    kw = {"gap": gap} if gap is not None else {}
    return select_channels(problem, k=k, method=method, backend=backend, time_limit=time_limit, seed=seed,
                           options=options, **kw)


def prune_by_groups(model: nn.Module, data: Iterable, example: torch.Tensor, targets: Mapping[str, int], *,
                    method: str = "lasso", sequential: bool = True, backend: str | None = None,
                    time_limit: float | None = None, gap: float | None = None, positions: int = 10,
                    max_samples: int | None = None, seed: int = 0, graph: ChannelGraph | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, on_step=None, streamed: bool = True,
                    options: Mapping[str, Any] | None = None
                    ) -> GroupPruning:
    """Prune every group named in ``targets`` ({group name: units to keep}) of ``model`` (not modified).

    ``data``: a re-iterable of calibration batches; ``example``: one batch for tracing and checks.
    ``on_step(message)`` is called before each capture and selection (for progress bars).
    ``max_memory``: bytes that one group's statistics may take (:func:`statistics_bytes`, estimated
    before anything is allocated); a group above it stays whole and ``skipped`` in the result says
    why (``None``: no cap). With ``sequential=False`` all groups' statistics live at once and the cap
    applies to their sum. ``streamed``: the sequential driver's captures run from cached activations of
    the pruned model up to their last consumer, with the dense targets recorded once (module docstring;
    ``False``: a full forward of both models per group). ``options``: the method's own keyword arguments
    (:func:`solvers.select_channels`'s ``options``).
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
    plans = {g.name: "gram" for g in todo}
    rows_of: dict[str, int] = {}
    if max_memory is not None:
        kept, total = [], 0
        for g in todo:
            need = memory[g.name] if sequential else total + memory[g.name]
            if need > max_memory and sequential:
                # consumers one after another, as rows when they see fewer rows than columns
                if not rows_of:
                    rows_of = calibration_rows(model, data, example, list(dict.fromkeys(
                        m.module for x in todo for m in x.consumers)), positions=positions, max_samples=max_samples)
                lean = lean_statistics_bytes(model, g, rows_of)
                if lean <= max_memory:
                    plans[g.name], memory[g.name] = "lean", lean
                    kept.append(g)
                    continue
                skipped[g.name] = (f"statistics need {need / 2**30:.2f} GiB as Grams, {lean / 2**30:.2f} GiB with "
                                   f"one consumer at a time (samples when rows < columns) > max_memory "
                                   f"{max_memory / 2**30:.2f} GiB")
                continue
            if need > max_memory:
                skipped[g.name] = (f"statistics need {memory[g.name] / 2**30:.2f} GiB"
                                   f" ({need / 2**30:.2f} GiB with the groups before, one-shot capture; "
                                   f"sequential=True processes groups one at a time) > max_memory "
                                   f"{max_memory / 2**30:.2f} GiB")
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
            res = _select(problem, targets[g.name], method, backend, time_limit, seed, gap, model=model, group=g,
                          data=data, options=options)
            results[g.name], masks[g.name] = _without_weights(res), res.mask.copy()
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
    stream, recorded = None, None
    streamed_groups = [g for g in todo if plans[g.name] == "gram"]
    if streamed and streamed_groups:
        stream, _why = CachedForward.create(model, data, example)
    if stream is not None:
        # the dense targets of every consumer, at the rows its capture will sample: one dense pass
        ynames = list(dict.fromkeys(m.module for g in streamed_groups for m in g.consumers))
        yrows = calibration_rows(model, data, example, ynames, positions=positions, max_samples=max_samples)
        ybytes = target_rows_bytes(model, yrows, ynames)
        if max_memory is None or ybytes + max(memory[g.name] for g in streamed_groups) <= max_memory:
            step(f"recording dense targets of {len(ynames)} consumers (≈ {ybytes / 2**20:.0f} MiB)")
            recorded = record_target_rows(model, data, ynames, positions=positions, max_samples=max_samples,
                                          seed=seed, forward=stream.runner(stream.stop_index(ynames)))
    for position, g0 in enumerate(todo):
        g = next(x for x in current_graph.groups if x.name == g0.name)
        names = [m.module for m in g.consumers]
        lean = plans[g.name] == "lean"
        step(f"calibrating {g.name} ({len(names)} consumers, statistics ≈ {memory[g.name] / 2**20:.1f} MiB"
             f"{', one consumer at a time' if lean else ''})")
        t0 = time.perf_counter()
        common = dict(positions=positions, max_samples=max_samples, seed=seed,
                      target=model if current is not model else None)
        channels = {n: out_index[n] for n in names if n in out_index}
        cols = {m.module: m.columns_per_channel for m in g.consumers}
        via = "full forwards"
        if lean:
            stats = _one_at_a_time(current, data, g, rows_of, channels=channels, **common)
        elif stream is not None:
            held = sum(t.numel() * t.element_size() for calls in (recorded or {}).values()
                       for batch in calls for t in batch if t is not None)
            # every change so far lies after this cut: it may move up to the first member still to do
            first = stream.first_index({m.module for x in todo[position:] for m in x.members})
            _advance_within(stream, stream.cut_before(first),
                            None if max_memory is None else max_memory - memory[g.name] - held)
            kw = {"forward": stream.runner(stream.stop_index(names))}
            if recorded is not None and common["target"] is not None:
                kw["target_rows"], common["target"] = recorded, None
                kw["forward"] = stream.runner(stream.stop_index(names), skip_last=True)
            stats = capture(current, data, names, columns_per_channel=cols, target_channels=channels, **common, **kw)
            via = f"streamed from {stream.nodes[stream.cut].name}"
        else:
            stats = capture(current, data, names, columns_per_channel=cols, target_channels=channels, **common)
        capture_time = time.perf_counter() - t0
        step(f"selecting {g.name} ({method})")
        problem = group_problem(g, stats)  # the lean plan captures here, one consumer after another
        if lean:
            capture_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = _select(problem, targets[g.name], method, backend, time_limit, seed, gap, model=current, group=g,
                      data=data, options=options)
        no_refit, n_columns = problem.error(res.mask, refit=False), problem.n_columns
        del problem  # before the refit: the lean plan recaptures its consumers one at a time
        res = results[g.name] = _without_weights(res)  # (the joint weights, before the consumers' refit)
        masks[g.name] = res.mask.copy()
        weights, errors = refit_consumers(g, res.mask, stats)
        select_time = time.perf_counter() - t1
        seen = stats.seen if lean else {n: (int(stats[n].n_samples), int(stats[n].gram.shape[0]), "LayerStatistics")
                                        for n in names}
        rows[g.name] = {"consumer_errors": errors, "capture_time": capture_time, "error_no_refit": no_refit,
                        "n_samples": {n: seen[n][0] for n in names}, "columns": n_columns,
                        "consumer_columns": {n: seen[n][1] for n in names}, "memory": memory[g.name],
                        "statistics": ("one consumer at a time (" + ", ".join(
                            f"{n}: {'samples' if seen[n][2] == 'LayerSamples' else 'Gram'}" for n in names) + ")")
                        if lean else "Grams", "calibration": via, "select_time": select_time}
        t2 = time.perf_counter()
        for (name, side), keep in channel_keeps(current_graph, {g.id: res.mask}).items():
            if side == "out":
                out_index[name] = out_index.get(name, np.arange(keep.size))[keep]
        current = prune_groups(current, current_graph, {g.id: res.mask}, weights, example)
        current_graph = current_graph.after_pruning({g.id: res.mask})  # no retrace: sliced like the model
        if stream is not None:
            stream.rebind(current)  # same trace: the cache (before every changed module) carries over
            if recorded is not None:  # release the targets no group still to do reads
                needed = {m.module for x in todo[position + 1:] for m in x.consumers}
                for n in [n for n in recorded if n not in needed]:
                    del recorded[n]
        rows[g.name]["surgery_time"] = time.perf_counter() - t2
    if current is model:
        current = copy.deepcopy(model)
    return GroupPruning(model=current, graph=graph, masks=masks, results=results, rows=rows, skipped=skipped,
                        memory=memory)
