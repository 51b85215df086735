"""The channel-group side of :class:`~mipprune.pruning.selector.ChannelSelector`.

``ChannelSelector(groups="auto")`` (the default) keeps the pair analysis of
:mod:`mipprune.pruning.graph` for models whose groups are all single producer → consumer pairs
(there both analyses agree) and switches to the channel graph of
:mod:`mipprune.pruning.channel_graph` as soon as a model has residual adds, concats, gates, depthwise
or grouped convolutions, or a stateless module called twice; ``groups="graph"`` forces it,
``groups="pairs"`` keeps the old behaviour. Here the selector's ``fit`` / ``get_support`` /
``report`` / ``prune`` are implemented for channel groups; the functions take the selector and set
the same fitted attributes (``groups_`` are then :class:`ChannelGroup`, keyed by group name).

Budgets (``flops=`` / ``params=``) over groups use the exact cost polynomial of
:mod:`mipprune.pruning.group_budget`; the reachable floor is checked before calibration; then every
group's error curve is computed on the dense model (one group's statistics at a time) and
:func:`~mipprune.pruning.group_budget.solve_group_widths` chooses the widths by a MILP on HiGHS
(products of coupled groups linearized; status, objective, bound and proven gap in ``budget_``;
``budget_time_limit`` seconds, default 30), landing in ``[(1 − budget_tolerance)·target, target]``
when the units allow.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from mipprune.pruning.channel_graph import ChannelGraph, build_channel_graph
from solvers.errors import InvalidInputError, MipPruneError, UnsupportedLayerError

__all__ = ["GROUP_MODES", "use_graph", "fit_graph", "graph_support", "graph_report_rows", "graph_caption",
           "graph_prune"]

GROUP_MODES = ("auto", "pairs", "graph")


def use_graph(selector, dense: nn.Module, example: torch.Tensor) -> ChannelGraph | None:
    """The channel graph when ``selector`` should prune over channel groups, else ``None``."""
    mode = getattr(selector, "groups", "auto")
    selector.trace_error_ = None
    if mode == "pairs":
        return None
    if mode == "graph":
        return build_channel_graph(dense, example)
    from mipprune.pruning.graph import find_prune_groups

    try:
        graph = build_channel_graph(dense, example)
    except UnsupportedLayerError as exc:
        selector.trace_error_ = str(exc)  # shown by report(): why the channel groups were not used
        return None  # untraceable: the pair analysis has its nn.Sequential fallback
    pairs = {(g.producer, g.consumer, g.n_channels, g.columns_per_channel)
             for g in find_prune_groups(dense, example)}
    simple = {(g.producers[0].module, g.consumers[0].module, g.n_units, g.consumers[0].columns_per_channel)
              for g in graph.prunable if len(g.producers) == len(g.consumers) == 1 and g.unit_size == 1
              and not any(m.role == "grouped" for m in g.members)
              and all(np.all(m.units >= 0) for m in g.members)}
    if not pairs and not graph.prunable:
        graph.require_prunable()  # nothing at all: say which ops blocked each layer
    if len(simple) == len(graph.prunable) and simple == pairs:
        return None
    return graph


def _targets(selector, graph: ChannelGraph, dense: nn.Module, data, example: torch.Tensor, on_step):
    """(targets {group: units}, budget summary or None, the WidthAllocation or None)."""
    from mipprune.pruning.group_budget import DEFAULT_BUDGET_TIME_LIMIT, group_cost, solve_group_widths
    from mipprune.pruning.group_pruning import DEFAULT_MAX_MEMORY, curve_calibration, group_curves, group_targets

    groups = graph.require_prunable()
    if selector.sparsity is not None or selector.k is not None:
        return group_targets(groups, sparsity=selector.sparsity, k=selector.k), None, None
    if selector.budget_backend != "highs":
        raise InvalidInputError(f"budget_backend must be 'highs' for channel groups (their MILP has products of any "
                                f"two coupled groups; CP-SAT serves chains of pairs, groups='pairs'); got "
                                f"{selector.budget_backend!r}")
    metric = "flops" if selector.flops is not None else "params"
    target = selector.flops if selector.flops is not None else selector.params
    cost = group_cost(dense, graph, example, metric)
    cost.check_reachable(target)  # before any calibration
    t0 = time.perf_counter()
    curve_data, curve_positions, used, total = curve_calibration(data, selector.positions)
    curves = group_curves(dense, curve_data, graph, positions=curve_positions, max_samples=selector.max_samples,
                          seed=selector.seed, max_memory=getattr(selector, "max_memory", DEFAULT_MAX_MEMORY),
                          on_step=on_step)
    curve_time = time.perf_counter() - t0
    if on_step is not None:
        on_step("allocating widths (HiGHS MILP)")
    time_limit = selector.budget_time_limit if selector.budget_time_limit is not None else DEFAULT_BUDGET_TIME_LIMIT
    alloc = solve_group_widths(cost, curves, target, selector.budget_tolerance, time_limit=time_limit)
    widths = alloc.widths
    lo = (1.0 - selector.budget_tolerance) * target
    summary = {"metric": metric, "target": float(target), "tolerance": selector.budget_tolerance,
               "window": [lo, float(target)], "dense": cost.dense, "predicted": cost.cost(widths),
               "predicted_ratio": cost.ratio(widths), "floor": cost.floor(), "widths": dict(widths),
               "allocation": {"status": str(alloc.status.value), "objective": alloc.objective, "bound": alloc.bound,
                              "gap": alloc.gap, "backend": alloc.backend, "source": alloc.source,
                              "ratio": alloc.ratio, "solve_time": alloc.solve_time, "time_limit": time_limit,
                              **{k: v for k, v in alloc.info.items() if k in ("window", "binaries", "mip_nodes")}},
               "curves": "forward-greedy refit error per k of each group's joint problem, on the dense model"
                         + (f", from the first {used} of {total} images at {curve_positions} positions each"
                            if used < total else ""),
               "curve_time": curve_time,
               "fixed": {g: list(r) for g, r in cost.fixed.items()}}
    return widths, summary, alloc


def fit_graph(selector, model: nn.Module, dense: nn.Module, data, example: torch.Tensor, graph: ChannelGraph,
              home, start: float, *, fingerprint, progress):
    """``ChannelSelector.fit`` over channel groups (see the module docstring); ``fingerprint(model)``
    and ``progress(enabled)`` are the selector's helpers (a rich Progress factory)."""
    from mipprune.pruning.group_budget import measure_cost
    from mipprune.pruning.criteria import CRITERIA, group_scores
    from mipprune.pruning.group_pruning import DEFAULT_MAX_MEMORY, prune_by_groups
    from solvers.selection.select import METHODS

    if selector.method not in METHODS and selector.method not in CRITERIA and selector.method != "tecu":
        raise InvalidInputError(f"method must be one of {sorted(METHODS) + list(CRITERIA) + ['tecu']} for a model with "
                                f"merged channel groups (residual adds, concats, gates, grouped convs); got "
                                f"{selector.method!r}")
    with progress(selector.progress) as bar:
        task = None
        calls = [0]

        def step(message: str) -> None:  # one message per capture, selection or error curve
            if calls[0]:
                bar.advance(task)
            calls[0] += 1
            bar.update(task, description=message)

        if selector.flops is not None or selector.params is not None:
            task = bar.add_task("budget curves", total=len(graph.prunable) + 2)
        targets, budget, allocation = _targets(selector, graph, dense, data, example, step)
        todo = [g for g in graph.prunable if g.name in targets and targets[g.name] < g.n_units]
        if selector.method == "bn_scale":  # fail before the selection's calibration
            for g in todo:
                group_scores("bn_scale", dense, g)
        if task is not None:
            bar.update(task, completed=len(graph.prunable) + 2)
        task = bar.add_task("calibrating", total=2 * len(todo))
        calls[0] = 0

        history = None
        if selector.method == "tecu" and todo:  # block-coordinate descent over the groups (tecu_groups)
            from mipprune.pruning.tecu_groups import tecu_groups

            bar.update(task, total=None, description="TECU")
            out = tecu_groups(dense, data, example, targets, graph=graph, max_iter=selector.max_iter,
                              objective=selector.objective, exact_max_channels=selector.exact_max_channels,
                              time_limit=selector.time_limit, positions=selector.positions,
                              max_samples=selector.max_samples, seed=selector.seed, backend=selector.backend,
                              max_memory=getattr(selector, "max_memory", DEFAULT_MAX_MEMORY),
                              on_step=lambda msg: bar.update(task, description=f"TECU {msg}"))
            history = out.history
        else:
            out = prune_by_groups(dense, data, example, targets, method=selector.method,
                                  sequential=selector.sequential, backend=selector.backend,
                                  time_limit=selector.time_limit, gap=selector.gap, positions=selector.positions,
                                  max_samples=selector.max_samples, seed=selector.seed, graph=graph,
                                  max_memory=getattr(selector, "max_memory", DEFAULT_MAX_MEMORY), on_step=step,
                                  options=getattr(selector, "method_options", None))
        bar.update(task, total=2 * len(todo), completed=2 * len(todo))
    if budget is not None:
        achieved = measure_cost(out.model, example, budget["metric"])
        lo, hi = budget["window"]
        budget.update(achieved=achieved, achieved_ratio=achieved / budget["dense"],
                      in_window=bool(lo - 1e-12 <= achieved / budget["dense"] <= hi + 1e-12))
    selector.graph_ = graph
    selector.groups_ = graph.prunable
    selector.masks_ = out.masks
    selector.results_ = out.results
    selector.skipped_ = out.skipped
    selector._rows = out.rows
    selector._targets_used = targets
    selector.allocation_ = allocation  # a solvers.polynomial_budget.WidthAllocation (budgets), else None
    selector.budget_ = budget
    selector.tecu_history_ = history
    selector.pruned_model_ = out.model.to(home)
    selector.example_input_ = example.cpu()
    selector.fit_time_ = time.perf_counter() - start
    selector._fitted_id = id(model)
    selector._fitted_fingerprint = fingerprint(model)
    return selector


def _group_named(selector, layer: str):
    graph: ChannelGraph = selector.graph_
    for test in (lambda g: g.name == layer,
                 lambda g: any(m.module == layer and m.role == "producer" for m in g.members),
                 lambda g: any(m.module == layer for m in g.members)):
        hits = [g for g in graph.prunable if test(g)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InvalidInputError(f"layer {layer!r} belongs to several groups {[g.name for g in hits]}; name the "
                                    "group or one of its producers")
    raise InvalidInputError(f"layer must be a prunable group or one of its layers (groups "
                            f"{[g.name for g in graph.prunable]}); got {layer!r}")


def graph_support(selector, layer: str) -> np.ndarray:
    """Bool mask (n_units,) of the kept units of the group named ``layer`` (or holding that layer)."""
    return selector.masks_[_group_named(selector, layer).name].copy()


def graph_report_rows(selector) -> list[dict]:
    """One row per pruned group: the pair rows' keys (``layer`` is the group name, ``rel_error`` the
    mean of its consumers' relative errors) plus ``consumers`` {name: rel. error}, ``units`` and ``memory``."""
    mods = dict(selector.pruned_model_.named_modules())
    rows = []
    for g in selector.groups_:
        res = selector.results_.get(g.name)
        if res is None:
            continue
        extra = selector._rows[g.name]
        errors = extra["consumer_errors"]
        types = sorted({type(mods[m.module]).__name__ for m in g.producers if m.module in mods})
        rows.append({
            "layer": g.name, "type": "/".join(types) or "group", "producer": "+".join(m.module for m in g.producers),
            "consumers": dict(errors), "kept": int(res.mask.sum()), "total": g.n_units, "unit_size": g.unit_size,
            "rel_error": float(np.mean(list(errors.values()))), "objective": float(res.objective),
            "error_no_refit": float(extra["error_no_refit"]), "bound": res.bound, "gap": res.gap,
            "status": str(res.status.value), "method": res.method, "backend": res.backend,
            "solve_time": float(res.solve_time), "capture_time": float(extra["capture_time"]),
            "n_samples": int(sum(extra["n_samples"].values())), "memory": int(extra["memory"]),
        })
    return rows


def graph_caption(selector) -> str:
    """What the report adds for groups: fixed groups and why, groups skipped for memory, the budget."""
    lines = ["groups: channels removed together across all their layers; rel. error: mean over the group's "
             "consumers (each refitted); objective: the joint problem's error (Σ consumer rel. errors, normalized)"]
    fixed = [g for g in selector.graph_.groups if g.fixed and any(m.role != "consumer" for m in g.members)]
    if fixed:
        lines.append("kept whole: " + "; ".join(f"{g.name} ({'; '.join(g.fixed)})" for g in fixed[:10])
                     + (f"; … {len(fixed) - 10} more" if len(fixed) > 10 else ""))
    short = sorted({f"{c} ({r['n_samples'][c]} < {d})" for r in selector._rows.values()
                    for c, d in r.get("consumer_columns", {}).items() if r["n_samples"][c] < d})
    if short:
        lines.append("fewer calibration rows than columns (the refit may overfit; add data or positions): "
                     + ", ".join(short[:8]) + (f", … {len(short) - 8} more" if len(short) > 8 else ""))
    if selector._rows:
        cap = getattr(selector, "max_memory", None)
        est = sorted(((r["memory"], n, r.get("statistics", "Grams")) for n, r in selector._rows.items()), reverse=True)
        lines.append(f"statistics memory, estimated before allocation (max_memory "
                     f"{'none' if cap is None else f'{cap / 2**30:.2f} GiB'}): "
                     + ", ".join(f"{n} {b / 2**20:.1f} MiB ({how})" for b, n, how in est[:6])
                     + (f", … {len(est) - 6} more" if len(est) > 6 else ""))
    for name, why in selector.skipped_.items():
        lines.append(f"kept whole for memory: {name}: {why}")
    b = selector.budget_
    if b is not None:
        lo, hi = b["window"]
        a = b["allocation"]
        gap = "-" if a["gap"] is None else f"{100 * a['gap']:.2g}%"
        lines.append(f"{b['metric']} budget {b['target']:g}: achieved {b['achieved_ratio']:.4f} of dense "
                     f"({'in' if b['in_window'] else 'OUTSIDE'} [{lo:.4f}, {hi:.4f}]; floor {b['floor']:.4f}); "
                     f"widths: HiGHS MILP {a['status']}, Σ err {a['objective']:.4g}, bound "
                     f"{'-' if a['bound'] is None else format(a['bound'], '.4g')}, gap {gap}"
                     + (" (greedy warm start kept)" if a["source"] == "start" else "")
                     + (f"; {a['window']}" if "window" in a else ""))
    return "\n".join(lines)


def graph_prune(selector, model: nn.Module, reconstruct: bool) -> nn.Module:
    """``ChannelSelector.prune`` over channel groups."""
    from mipprune.pruning.group_surgery import prune_groups
    from mipprune.torch_utils import eval_mode, model_device

    example = selector.example_input_.to(model_device(model))
    with eval_mode(model), torch.no_grad():
        try:
            graph = build_channel_graph(model, example)
        except MipPruneError:
            raise
    want = [(g.name, g.n_units) for g in selector.graph_.prunable]
    got = [(g.name, g.n_units) for g in graph.prunable]
    if want != got:
        raise InvalidInputError(f"model must have the channel groups of the fitted one {want}; got {got}")
    masks = {g.id: selector.masks_[g.name] for g in graph.prunable if not selector.masks_[g.name].all()}
    pruned = prune_groups(model, graph, masks, example_input=example)
    if reconstruct:
        fitted = dict(selector.pruned_model_.named_modules())
        mods = dict(pruned.named_modules())
        for g in graph.prunable:
            for m in g.consumers:
                if g.name in selector.results_:
                    with torch.no_grad():
                        mods[m.module].weight.copy_(fitted[m.module].weight.to(mods[m.module].weight.device))
    return pruned if masks else copy.deepcopy(model)
