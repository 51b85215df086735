"""TECU over channel groups: block-coordinate descent on models with residual adds, concats, gates,
depthwise and grouped convolutions (the groups of :mod:`mipprune.pruning.channel_graph`).

The pair version (:mod:`mipprune.pruning.tecu`) works on producer → consumer pairs, whose statistics
depend on the pruned *prefix* only. A channel group's consumers are spread over the network (a
residual stream's group is read by every block of a stage), so here a block's statistics come from
the model with *every other* group pruned:

* **Blocks** are the prunable groups that the budget (``flops=`` / ``params=``, widths from
  :func:`~mipprune.pruning.group_budget.solve_group_widths`) or ``sparsity`` / ``k`` prune, each with
  its width fixed.
* **Iteration 0** is He et al.'s sequential pass, :func:`~mipprune.pruning.group_pruning.prune_by_groups`
  with the embedded solver (:func:`~mipprune.pruning.tecu.embedded_solver`) of the largest block —
  one method for the pass, because ``prune_by_groups`` takes one; the smaller blocks get their own
  embedded solver (``"exact"`` up to ``exact_max_channels`` units) from iteration 1 on. Its widths
  are the targets (``"exact"`` keeps *at most* k units; later iterations keep exactly k).
* **Later iterations** visit the blocks in forward order. For block ``g``, the model ``M₋g`` is the
  current state with ``g`` whole: every other group pruned, every consumer with its current weights
  (zero on ``g``'s dropped channels, so ``M₋g`` computes what the current model does). ``g``'s
  consumers are captured on ``M₋g`` with targets ``Y`` from the dense model (restricted to the
  outputs each layer still has), giving the joint problem
  (:func:`~mipprune.pruning.joint.group_problem`); its units are re-selected by the embedded
  solver under the inexactness schedule of :class:`~mipprune.pruning.tecu.InexactSchedule` (exact
  with a gap ``ε_t`` in ``τ_t`` seconds, or greedy / LASSO followed by 1-swap local search);
  every consumer of ``g`` is refitted by least squares on all its kept columns
  (:func:`~mipprune.pruning.joint.refit_consumers`: a conv reading a concat of two groups keeps and
  refits the other group's columns too). When the new units are no better on these statistics than
  the current ones, the candidate is the current units with the consumers refitted (tried once per
  change of the statistics).
* **Monotone acceptance.** The candidate network is scored by
  :class:`~mipprune.pruning.tecu.EndToEndObjective` and accepted only if the objective does not
  increase (strictly decreases for a refit-only candidate); so the recorded objective never increases.

State: the masks and, per consumer, its weights in the *dense* layout (all input columns × all
output channels of the dense layer): every model (``M₋g``, candidates) is one
:func:`~mipprune.pruning.group_surgery.prune_groups` call on the dense model. Rows of an output
channel that another group removed keep their last fitted value (at first the dense weights):
``M₋h`` restores those channels from them.

Cost per visited block: two model copies, one capture of its consumers, one sub-solve and (when a
candidate is built) one pass of the objective; a final capture measures every consumer's error on
the returned model for the report. A block whose statistics exceed ``max_memory`` as Grams (the
initial pass then captured it one consumer at a time) keeps its initial selection.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mipprune.pruning import tecu as _tecu
from mipprune.pruning.bridge import capture, layer_weights
from mipprune.pruning.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph
from mipprune.pruning.group_pruning import DEFAULT_MAX_MEMORY, GroupPruning, prune_by_groups, statistics_bytes
from mipprune.pruning.group_surgery import channel_keeps, prune_groups
from mipprune.pruning.joint import group_problem, refit_consumers
from solvers.errors import InvalidInputError
from solvers.result import SelectionResult, Status

__all__ = ["tecu_groups", "GroupTecuOutcome"]


@dataclass
class _Block:
    group: ChannelGroup
    k: int
    solver: str
    mask: np.ndarray                  # (n_units,) kept units
    result: SelectionResult | None    # the last sub-solve (joint problem) that this mask came from
    result_version: int | None        # state version of the statistics ``result`` is valid on
    fitted_version: int | None        # state version on whose M₋g statistics the consumers were refitted
    error: float                      # joint refit error of ``mask`` on its last statistics
    error_no_refit: float
    capture_time: float
    columns: int
    frozen: str = ""                  # why the block is not revisited (statistics above max_memory)
    converged: bool = False


@dataclass
class GroupTecuOutcome:
    """What :func:`tecu_groups` returns.

    Attributes
    ----------
    model : nn.Module — the pruned network of the final state.
    graph : ChannelGraph — the dense model's channel groups.
    masks : {group name: bool array (n_units,)} — kept units of every prunable group.
    results : {group name: SelectionResult} — per block: ``method="tecu"``, ``info["embedded"]`` the
        block solver; bound and gap only when the block's last sub-solve ran on the final state's
        statistics (else ``Status.FEASIBLE``, ``info["refitted"]``, objective = the refit error of the
        mask on the block's last statistics).
    history : list of dict — per outer iteration (0 = the sequential pass): ``iteration``, ``objective``
        (after it), ``accepted`` (blocks whose new units were accepted), ``refitted`` (blocks whose
        refit alone was accepted), ``rejected``, ``unchanged``, ``time_limit`` (τ_t), ``gap_tolerance``
        (ε_t), ``time`` (seconds); iteration 0 also ``solver``.
    rows : {group name: dict} — report rows as :func:`prune_by_groups` gives them; ``consumer_errors``
        are measured on the returned model (each consumer's current weights, inputs from that model,
        targets from the dense one).
    skipped : {group name: reason} — groups the initial pass left whole (memory).
    initial : GroupPruning — the outcome of iteration 0.
    """

    model: nn.Module
    graph: ChannelGraph
    masks: dict[str, np.ndarray]
    results: dict[str, SelectionResult]
    history: list[dict]
    rows: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    initial: GroupPruning | None = None


def _restricted(group: ChannelGroup, keeps: Mapping[tuple[str, str], np.ndarray]) -> ChannelGroup:
    """``group`` as it is in a model where other groups removed channels: each consumer's units
    restricted to the input channels it still reads (the group's own channels all kept)."""
    members = [dataclasses.replace(m, units=m.units[keeps[(m.module, "in")]])
               if m.role == "consumer" and (m.module, "in") in keeps else m for m in group.members]
    return dataclasses.replace(group, members=members)


def _index(keep: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if keep is None else keep


def _dense_layout(dense_w: np.ndarray, fitted: np.ndarray, keep_in: np.ndarray, keep_out: np.ndarray,
                  old: np.ndarray | None = None) -> np.ndarray:
    """Weights (d_dense, m_dense) from ``fitted`` (kept columns × kept outputs); removed input
    columns zero; removed outputs keep ``old`` (else the dense weights)."""
    rows = np.repeat(keep_in, dense_w.shape[0] // keep_in.size)
    if fitted.shape != (int(rows.sum()), int(keep_out.sum())):
        raise InvalidInputError(f"consumer weights must have shape ({int(rows.sum())}, {int(keep_out.sum())}) "
                                f"(kept columns × kept outputs); got {fitted.shape}")
    out = (dense_w if old is None else old).copy()
    out[~rows] = 0.0
    out[np.ix_(rows, keep_out)] = fitted
    return out


def tecu_groups(dense: nn.Module, data: Iterable, example: torch.Tensor, targets: Mapping[str, int], *,
                graph: ChannelGraph | None = None, max_iter: int = 3, objective: str = "output",
                exact_max_channels: int = 64, time_limit: float | None = None, base_time: float = 0.25,
                growth: float = 2.0, base_gap: float = 0.05, shrink: float = 0.1, gap_min: float = 1e-4,
                positions: int = 10, max_samples: int | None = None, seed: int = 0, backend: str | None = None,
                max_memory: int | None = DEFAULT_MAX_MEMORY, on_step=None) -> GroupTecuOutcome:
    """Run TECU over the channel groups of ``dense`` (see the module docstring).

    Parameters
    ----------
    dense : nn.Module
        The trained network (read only).
    data : re-iterable of batches
        Calibration data (labels needed for ``objective="task"``).
    example : tensor
        One input batch (tracing and surgery checks).
    targets : {group name: units to keep}
        Widths of the blocks; groups not named, or named with all their units, stay whole.
    graph : ChannelGraph, optional
        ``build_channel_graph(dense, example)`` when already built.
    max_iter, objective, exact_max_channels, time_limit, base_time, growth, base_gap, shrink, gap_min :
        As in :func:`mipprune.pruning.tecu.tecu` (``time_limit`` is τ_max, the tightest sub-solve limit).
    positions, max_samples, seed : as in :func:`mipprune.pruning.bridge.capture`.
    backend : str, optional
        Backend of the exact solver.
    max_memory : int or None
        Bytes one group's float64 statistics may take (as in :func:`prune_by_groups`).
    on_step : callable, optional
        Called with a short description before each capture / solve (progress reporting).
    """
    schedule = _tecu.InexactSchedule.of(max_iter, time_limit, base_time, growth, base_gap, shrink, gap_min)
    if objective not in _tecu.OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {list(_tecu.OBJECTIVES)}; got {objective!r}")
    if isinstance(exact_max_channels, bool) or not isinstance(exact_max_channels, (int, np.integer)) \
            or exact_max_channels < 0:
        raise InvalidInputError(f"exact_max_channels must be an integer >= 0; got {exact_max_channels!r}")
    graph = graph or build_channel_graph(dense, example)
    by_name = {g.name: g for g in graph.prunable}
    for name, k in targets.items():
        if name not in by_name:
            raise InvalidInputError(f"targets must name prunable groups {sorted(by_name)}; got {name!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= by_name[name].n_units:
            raise InvalidInputError(f"targets[{name!r}] must be an integer in [1, {by_name[name].n_units}] (units of "
                                    f"the group); got {k!r}")
    todo = [g for g in graph.prunable if g.name in targets and targets[g.name] < g.n_units]
    if not todo:
        raise InvalidInputError("targets must prune at least one channel group (fewer units than it has); got none")
    step = on_step or (lambda _msg: None)
    score = _tecu.EndToEndObjective(dense, data, objective)
    common = dict(positions=positions, max_samples=max_samples, seed=seed)
    cols = {m.module: m.columns_per_channel for g in graph.groups for m in g.consumers}
    n_in = {m.module: m.units.size for g in graph.groups for m in g.consumers}  # dense input channels
    dense_mods = dict(dense.named_modules())

    # ---- iteration 0: He et al.'s sequential pass, one embedded solver (that of the largest block)
    t_iter = time.perf_counter()
    first = _tecu.embedded_solver(max(g.n_units for g in todo), exact_max_channels)
    exact0 = first == "exact"
    initial = prune_by_groups(dense, data, example, dict(targets), method=first, sequential=True,
                              backend=backend if exact0 else None, time_limit=schedule.tau(0) if exact0 else None,
                              gap=schedule.eps(0) if exact0 else None, graph=graph, max_memory=max_memory,
                              on_step=lambda msg: step(f"iteration 0: {msg}"), **common)
    blocks = {g.name: _Block(g, int(targets[g.name]), _tecu.embedded_solver(g.n_units, exact_max_channels),
                             initial.masks[g.name].copy(), initial.results[g.name], None, None,
                             float(initial.results[g.name].objective), float(initial.rows[g.name]["error_no_refit"]),
                             float(initial.rows[g.name]["capture_time"]), int(initial.rows[g.name]["columns"]))
              for g in todo if g.name in initial.results}
    for name, b in blocks.items():
        need = initial.memory.get(name, 0)
        if max_memory is not None and need > max_memory:
            b.frozen = (f"statistics need {need / 2**30:.2f} GiB as Grams > max_memory {max_memory / 2**30:.2f} GiB: "
                        "kept at the initial pass's selection")
    current = initial.model
    value = score(current)
    # every consumer of a block in the dense layout, so that any state is one prune_groups call on dense
    masks = {name: b.mask for name, b in blocks.items()}
    keeps = channel_keeps(graph, {b.group.id: b.mask for b in blocks.values()})
    pruned_mods = dict(current.named_modules())
    weights: dict[str, np.ndarray] = {}
    for b in blocks.values():
        for m in b.group.consumers:
            if m.module not in weights:
                dw = layer_weights(dense_mods[m.module])
                weights[m.module] = _dense_layout(
                    dw, layer_weights(pruned_mods[m.module]), _index(keeps.get((m.module, "in")), m.units.size),
                    _index(keeps.get((m.module, "out")), dw.shape[1]))

    def build(state_masks: Mapping[str, np.ndarray], state_weights: Mapping[str, np.ndarray],
              check: bool = False) -> nn.Module:
        ids = {blocks[n].group.id: mk for n, mk in state_masks.items() if not mk.all()}
        return prune_groups(dense, graph, ids, state_weights, example if check else None)

    def statistics(model: nn.Module, names: list[str], state_keeps) -> dict:
        channels = {n: np.flatnonzero(state_keeps[(n, "out")]) for n in names if (n, "out") in state_keeps}
        return capture(model, data, names, target=dense, target_channels=channels,
                       columns_per_channel={n: cols[n] for n in names}, **common)

    history: list[dict] = [{"iteration": 0, "objective": value, "accepted": list(blocks), "refitted": [],
                            "rejected": [], "unchanged": [], "time_limit": schedule.tau(0),
                            "gap_tolerance": schedule.eps(0), "time": time.perf_counter() - t_iter,
                            "solver": first}]
    version = 0  # bumped by every accepted candidate: statistics captured at an older version are stale

    for t in range(1, int(max_iter) + 1):
        t_iter = time.perf_counter()
        tau, eps = schedule.tau(t), schedule.eps(t)
        accepted, refitted, rejected, unchanged = [], [], [], []
        for name, b in blocks.items():
            here = b.result_version == version
            if b.frozen or (b.converged and here):
                unchanged.append(name)
                continue
            g = b.group
            step(f"iteration {t}: {name} ({b.solver}, τ={tau:.2g}s, ε={eps:.0e})")
            t0 = time.perf_counter()
            others = {n: mk for n, mk in masks.items() if n != name}
            other_keeps = channel_keeps(graph, {blocks[n].group.id: mk for n, mk in others.items()})
            restricted = _restricted(g, other_keeps)
            names = [m.module for m in g.consumers]
            stats = statistics(build(others, weights), names, other_keeps)
            problem = group_problem(restricted, stats)
            b.capture_time = time.perf_counter() - t0
            res, done = _tecu._sub_solve(problem, b.k, b.solver, tau, eps, schedule.gap_min, t,
                                         b.mask if here else None, backend, seed)
            incumbent = problem.error(b.mask)
            b.error, b.columns = incumbent, problem.n_columns
            b.error_no_refit = problem.error(b.mask, refit=False)
            better = not np.array_equal(res.mask, b.mask) and res.objective < incumbent
            if not better:
                # no better units on these statistics: keep them, with the new certificate if it is tighter
                if not here or _tecu._tighter(res.bound, b.result.bound if b.result else None):
                    same = np.array_equal(res.mask, b.mask) or b.solver == "exact"  # optimal ⇒ so is b
                    b.result = _tecu._certify(problem, b.mask, problem.refit(b.mask), res)
                    b.result_version, b.converged = version, done and same
                if b.fitted_version == version:
                    unchanged.append(name)
                    continue
            new_mask = res.mask.copy() if better else b.mask
            fitted, _ = refit_consumers(restricted, new_mask, stats)
            del stats
            cand_masks = {**masks, name: new_mask}
            cand_keeps = channel_keeps(graph, {blocks[n].group.id: mk for n, mk in cand_masks.items()})
            cand_weights = dict(weights)
            for c, w in fitted.items():
                old = weights[c]
                new = _dense_layout(layer_weights(dense_mods[c]), w, _index(other_keeps.get((c, "in")), n_in[c]),
                                    _index(other_keeps.get((c, "out")), old.shape[1]), old)
                keep_in = cand_keeps.get((c, "in"))
                if keep_in is not None:  # the new mask's dropped channels: zero rows in every output
                    new[~np.repeat(keep_in, new.shape[0] // keep_in.size)] = 0.0
                cand_weights[c] = new
            cand_model = build(cand_masks, cand_weights)
            cand_value = score(cand_model)
            if cand_value < value or (better and cand_value == value):
                current, value, masks, weights = cand_model, cand_value, cand_masks, cand_weights
                version += 1
                b.fitted_version = None  # refitted on statistics that are now a version old
                if better:
                    b.mask, b.result, b.result_version, b.converged = new_mask, res, version - 1, False
                    b.error = float(res.objective)
                    accepted.append(name)
                else:
                    refitted.append(name)
            else:
                if not better:
                    b.fitted_version = version  # this refit was tried on these statistics: not again
                rejected.append(name)
        history.append({"iteration": t, "objective": value, "accepted": accepted, "refitted": refitted,
                        "rejected": rejected, "unchanged": unchanged, "time_limit": tau, "gap_tolerance": eps,
                        "time": time.perf_counter() - t_iter})
        if not accepted and not refitted and (tau >= schedule.time_limit or all(
                b.frozen or (b.converged and b.result_version == version) for b in blocks.values())):
            break

    # ---- results and report rows on the final state
    step("measuring every consumer on the pruned model")
    final_keeps = channel_keeps(graph, {b.group.id: b.mask for b in blocks.values()})
    consumers = list(dict.fromkeys(m.module for b in blocks.values() for m in b.group.consumers))
    measured: dict[str, tuple[float, int, int]] = {}
    mods = dict(current.named_modules())
    chunk: list[str] = []
    chunk_bytes = 0

    def flush() -> None:
        nonlocal chunk_bytes
        if chunk:
            for n, st in statistics(current, chunk, final_keeps).items():
                measured[n] = (st.problem().error_of(st.weights), int(st.n_samples), int(st.gram.shape[0]))
        chunk.clear()
        chunk_bytes = 0

    for n in consumers:
        d, m = layer_weights(mods[n]).shape
        need = 8 * (d * d + 2 * d * m)
        if max_memory is not None and need > max_memory:
            continue  # its Gram alone exceeds the cap: the initial pass's numbers are reported
        if chunk and max_memory is not None and chunk_bytes + need > max_memory:
            flush()
        chunk.append(n)
        chunk_bytes += need
    flush()

    results, rows = {}, {}
    for name, b in blocks.items():
        info = {"embedded": b.solver if b.result_version is not None else first}  # None: from the initial pass
        valid = b.result is not None and np.array_equal(b.result.mask, b.mask) and (
            b.result_version == version or (b.result_version is None and version == 0))
        if valid:
            res = dataclasses.replace(b.result, method="tecu", info={**b.result.info, **info})
        else:  # the statistics changed since the last sub-solve: its certificate no longer applies
            w = b.result.weights if b.result is not None else np.zeros((0, 0))
            res = SelectionResult(mask=b.mask.copy(), weights=w, objective=b.error, bound=None, gap=None,
                                  status=Status.FEASIBLE, method="tecu", backend=None, solve_time=0.0,
                                  info={**info, "refitted": True})
        results[name] = res
        first_rows = initial.rows[name]
        names = [m.module for m in b.group.consumers]
        rows[name] = {
            "consumer_errors": {n: measured[n][0] if n in measured else first_rows["consumer_errors"][n] for n in names},
            "capture_time": b.capture_time, "error_no_refit": b.error_no_refit,
            "n_samples": {n: measured[n][1] if n in measured else first_rows["n_samples"][n] for n in names},
            "consumer_columns": {n: measured[n][2] if n in measured else first_rows["consumer_columns"][n]
                                 for n in names},
            "columns": b.columns, "memory": initial.memory.get(name, statistics_bytes(dense, b.group)),
            "statistics": "Grams" + (f" ({b.frozen})" if b.frozen else ""),
        }
    all_masks = {g.name: masks.get(g.name, initial.masks[g.name]) for g in graph.prunable}
    return GroupTecuOutcome(model=current, graph=graph, masks={k: v.copy() for k, v in all_masks.items()},
                            results=results, history=history, rows=rows, skipped=dict(initial.skipped),
                            initial=initial)
