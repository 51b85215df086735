"""Network-wide budgets on the torch side: the FLOPs / parameter cost of group widths, error curves,
and the width allocation that :class:`~mipprune.pruning.selector.ChannelSelector` uses for ``flops=`` /
``params=`` targets.

**Cost model.** Pruning group ``g`` to ``k_g`` of its ``C_g`` channels shrinks its producer's outputs
and its consumer's inputs. A Conv2d / Linear ``M`` then costs

    cost_M(k) = cost_M(dense) · (k_in / C_in) · (k_out / C_out)

where ``in`` is the group whose consumer is ``M`` and ``out`` the group whose producer is ``M`` (a side
that belongs to no group keeps its ratio 1). Summed over the network this is a constant, a linear
term per group and a bilinear term ``k_g · k_h`` for every layer that consumes group ``g`` and
produces group ``h`` (consecutive groups). FLOPs are multiply-accumulates exactly as
:func:`mipprune.train.count_flops` counts them (hooks on one forward of one sample); parameters are
those of :func:`~mipprune.train.count_params`: weights (bilinear), biases and the BatchNorm affine
parameters of a group (linear), everything else constant. The model is exact for these counters,
and :func:`measure` checks the pruned network against the prediction.

**Error curves.** The value of keeping ``k`` channels of group ``g`` is its relative reconstruction
error ``err_g(k)`` after the least-squares refit. One forward-greedy pass on the group's selection
problem (captured once from the dense network) gives the whole curve ``k = 1 … C``
(:func:`solvers.selection.greedy.forward_path`: the refit error of each nested greedy set) — an upper bound on
the optimal ``err_g(k)`` at every ``k``, non-increasing.

**Allocation.** :func:`solvers.allocate_budget` picks one width per group minimizing ``Σ_g err_g(k_g)``
subject to ``(1 − tolerance)·target ≤ cost(k)/cost(dense) ≤ target``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mipprune.pruning.graph import PruneGroup
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError
from solvers.selection.problem import SelectionProblem

METRICS = ("flops", "params")

__all__ = ["CostModel", "cost_model", "error_curve", "layer_budgets", "WidthPlan", "allocate_widths", "measure",
           "METRICS"]


@dataclass(frozen=True)
class CostModel:
    """FLOPs or parameters of a network as a function of its groups' widths.

    Attributes
    ----------
    metric : "flops" or "params"
    names : list of str
        Group consumers, forward order.
    channels : {consumer: C}
    constant : float
        Cost that no width changes.
    linear : {consumer: float}
        Cost per kept channel of a group (times nothing else).
    bilinear : {(consumer g, consumer h): float}
        Cost per kept pair ``k_g · k_h`` (a layer consuming g and producing h).
    dense : float
        The dense network's total (= ``cost`` at full widths).
    """

    metric: str
    names: list[str]
    channels: dict[str, int]
    constant: float
    linear: dict[str, float]
    bilinear: dict[tuple[str, str], float]
    dense: float

    def cost(self, widths: Mapping[str, int] | None = None) -> float:
        """Total cost at ``widths`` ({consumer: k}; groups not named stay at full width)."""
        return polynomial_cost(self.channels, self.constant, self.linear, self.bilinear, widths)

    def ratio(self, widths: Mapping[str, int] | None = None) -> float:
        """``cost(widths) / dense``."""
        return self.cost(widths) / self.dense


def polynomial_cost(full: Mapping[str, int], constant: float, linear: Mapping[str, float],
                    pairs: Mapping[tuple[str, str], float], widths: Mapping[str, int] | None = None) -> float:
    """``constant + Σ_g linear[g]·k_g + Σ_(g,h) pairs[(g,h)]·k_g·k_h`` with ``k = full`` updated by
    ``widths`` (names not given stay at full width): the cost of pairs and of channel groups alike."""
    w = dict(full)
    w.update(widths or {})
    total = constant + sum(c * w[g] for g, c in linear.items())
    return total + sum(c * w[g] * w[h] for (g, h), c in pairs.items())


def _macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per Conv2d / Linear module for one sample (count_flops' formula)."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, int] = {}

    def hook(mod, _inp, res):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = (res.numel() // res.shape[0]) * (mod.in_channels // mod.groups) * kh * kw
        else:
            macs = (res.numel() // res.shape[0]) * mod.in_features
        out[names[mod]] = out.get(names[mod], 0) + int(macs)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with evaluation_mode(model):
            model(prepare_input(model, example[:1]))
    finally:
        for h in handles:
            h.remove()
    return out


def cost_model(model: nn.Module, groups: list[PruneGroup], example: torch.Tensor, metric: str = "flops"
               ) -> CostModel:
    """The :class:`CostModel` of ``model``'s FLOPs or parameters over the widths of ``groups``.

    ``example``: one input batch (only its first sample is used, for FLOPs).
    """
    from mipprune.train import count_flops, count_params

    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {list(METRICS)}; got {metric!r}")
    mods = dict(model.named_modules())
    by_consumer = {g.consumer: g for g in groups}
    by_producer = {g.producer: g for g in groups}
    constant, linear, bilinear = 0.0, {g.consumer: 0.0 for g in groups}, {}

    def add(value: float, g_in: PruneGroup | None, g_out: PruneGroup | None) -> None:
        nonlocal constant
        if g_in is not None:
            value /= g_in.n_channels
        if g_out is not None:
            value /= g_out.n_channels
        if g_in is not None and g_out is not None:
            key = (g_in.consumer, g_out.consumer)
            bilinear[key] = bilinear.get(key, 0.0) + value
        elif g_in is not None or g_out is not None:
            g = g_in or g_out
            linear[g.consumer] += value
        else:
            constant += value

    if metric == "flops":
        for name, macs in _macs(model, example).items():
            add(float(macs), by_consumer.get(name), by_producer.get(name))
        dense = float(count_flops(model, tuple(example.shape[1:])))
    else:
        modeled = 0
        for name, m in mods.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                g_in, g_out = by_consumer.get(name), by_producer.get(name)
                if g_in is None and g_out is None:
                    continue
                add(float(m.weight.numel()), g_in, g_out)
                modeled += m.weight.numel()
                if m.bias is not None:
                    add(float(m.bias.numel()), None, g_out)
                    modeled += m.bias.numel()
        for g in groups:
            for bn_name in g.batchnorms:
                for p in mods[bn_name].parameters(recurse=False):
                    add(float(p.numel()), None, g)
                    modeled += p.numel()
        dense = float(count_params(model))
        constant += dense - modeled
    bilinear = {key: v for key, v in bilinear.items() if v}
    model_ = CostModel(metric=metric, names=[g.consumer for g in groups],
                       channels={g.consumer: g.n_channels for g in groups}, constant=constant,
                       linear=linear, bilinear=bilinear, dense=dense)
    full = model_.cost()
    if not abs(full - dense) <= 1e-6 * max(dense, 1.0):  # pragma: no cover - a layer type the model misses
        raise InvalidInputError(f"the {metric} cost model must reproduce the dense total {dense:g}; got {full:g}")
    return model_


def error_curve(problem: SelectionProblem) -> np.ndarray:
    """Relative refit error (C,) of forward-greedy selection for ``k = 1 … C`` (entry ``k − 1``).

    One pass of :func:`solvers.selection.greedy.forward_path` in batches of ``⌈C/32⌉`` channels (nested
    greedy sets, the refit error of each from the explained energy). Each entry upper-bounds the optimal error at that ``k``; the curve is
    non-increasing and clipped to [0, 1].
    """
    from solvers.selection.greedy import forward_path

    # Gains scored once per 1/32 of the channels, each batch added as one block: every entry is still
    # the exact refit error of its prefix, the curves of wide groups cost matrix products instead of
    # C memory-bound updates (a 512-channel 3×3 joint problem: 32 s → 6 s, curve within 0.1 %).
    _, errors = forward_path(problem, batch=max(1, -(-problem.n_channels // 32)))
    return np.clip(np.minimum.accumulate(np.asarray(errors, dtype=np.float64)), 0.0, 1.0)


@dataclass
class WidthPlan:
    """What :func:`allocate_widths` returns: ``widths`` {consumer: k}, the solver's ``allocation``
    (a :class:`solvers.BudgetResult`), the ``cost`` model and a JSON-ready ``summary``."""

    widths: dict[str, int]
    allocation: object
    cost: CostModel
    curves: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)


def allocate_widths(dense: nn.Module, data: Iterable, groups: list[PruneGroup], example: torch.Tensor, *,
                    metric: str, target: float, backend: str = "highs", time_limit: float | None = None,
                    tolerance: float = 0.005, positions: int = 10, max_samples: int | None = None,
                    seed: int = 0) -> WidthPlan:
    """Per-group widths for a network-wide FLOPs / parameter target (fraction of the dense total kept).

    Captures every group's statistics once from ``dense``, computes the error curves
    (:func:`error_curve`) and the cost model (:func:`cost_model`), and calls
    :func:`solvers.allocate_budget`. Raises :class:`~solvers.errors.InfeasibleBudgetError` when no
    widths land in ``[(1 − tolerance)·target, target]``.
    """
    from mipprune.pruning.bridge import capture
    from solvers.budget import allocate_budget

    if isinstance(target, bool) or not isinstance(target, (int, float, np.number)) or not 0 < target <= 1:
        raise InvalidInputError(f"{metric} must be in (0, 1]; got {target}")
    both = {m: cost_model(dense, groups, example, m) for m in METRICS}
    costs = both[metric]
    t0 = time.perf_counter()
    stats = capture(dense, data, [g.consumer for g in groups], positions=positions, max_samples=max_samples,
                    columns_per_channel={g.consumer: g.columns_per_channel for g in groups}, seed=seed)
    curves = {g.consumer: error_curve(stats[g.consumer].problem()) for g in groups}
    curve_time = time.perf_counter() - t0
    layers = layer_budgets(both["flops"], both["params"], curves)
    result = allocate_budget(layers, float(target), metric=metric, backend=backend, time_limit=time_limit,
                             tolerance=tolerance)
    widths = {name: int(result.widths[name]) for name in costs.names}
    predicted = costs.cost(widths)
    summary = {
        "metric": metric, "target": float(target), "tolerance": float(tolerance),
        "window": [(1.0 - tolerance) * float(target), float(target)],
        "dense": costs.dense, "predicted": predicted, "predicted_ratio": predicted / costs.dense,
        "widths": {c: int(widths[c]) for c in costs.names},
        "channels": dict(costs.channels),
        "allocation": _allocation_summary(result),
        "curves": "forward-greedy refit error per k, one pass per group on dense-network statistics",
        "curve_time": curve_time,
    }
    return WidthPlan(widths=widths, allocation=result, cost=costs, curves=curves, summary=summary)


def measure(summary: dict, pruned: nn.Module, example: torch.Tensor) -> dict:
    """``summary`` with the pruned network's measured size: ``achieved`` (count_flops / count_params),
    ``achieved_ratio`` and ``in_window`` (whether it lies in the target window)."""
    from mipprune.train import count_flops, count_params

    achieved = (count_flops(pruned, tuple(example.shape[1:])) if summary["metric"] == "flops"
                else count_params(pruned))
    ratio = achieved / summary["dense"]
    lo, hi = summary["window"]
    return {**summary, "achieved": int(achieved), "achieved_ratio": ratio,
            "in_window": bool(lo - 1e-12 <= ratio <= hi + 1e-12)}


# ------------------------------------------------------------------------------- adapter to solvers.budget
def _chain_order(costs: CostModel) -> list[str]:
    """Groups ordered as consecutive chains: every bilinear pair (g, h) ends up as neighbours (g just
    before h), which is what :class:`solvers.budget.LayerBudget` can express. Each group has at most
    one bilinear predecessor (its producer consumes one group) and one successor (its consumer
    produces at most one group), so the pairs form disjoint paths; they are laid out one after another."""
    succ: dict[str, str] = {}
    pred: dict[str, str] = {}
    for g, h in costs.bilinear:
        if g in succ or h in pred or g == h:  # pragma: no cover - impossible for prune groups
            raise InvalidInputError(f"groups must couple in chains for a width budget; got {g!r} -> {h!r} twice")
        succ[g], pred[h] = h, g
    order: list[str] = []
    for name in costs.names:
        if name in pred:
            continue
        while True:
            order.append(name)
            if name not in succ:
                break
            name = succ[name]
    if len(order) != len(costs.names):  # pragma: no cover - a cycle cannot come out of a forward pass
        raise InvalidInputError(f"groups must couple in chains for a width budget; got a cycle among {costs.names}")
    return order


def layer_budgets(flops: CostModel, params: CostModel, curves: Mapping[str, np.ndarray]) -> list:
    """The :class:`solvers.budget.LayerBudget` chain of the groups: one entry per group whose width is
    the group's channel count, bilinear coefficients with its chain predecessor, linear ones per
    channel, and the network's constant cost as the first entry's fixed cost."""
    from solvers.budget import LayerBudget

    order = _chain_order(flops)
    if _chain_order(params) != order and params.bilinear:
        order = _chain_order(params) if not flops.bilinear else order
    layers = []
    for i, name in enumerate(order):
        prev = order[i - 1] if i > 0 else None
        kw = {}
        for metric, cm in (("flops", flops), ("params", params)):
            pair = cm.bilinear.get((prev, name), 0.0) if prev is not None else 0.0
            if any(h == name and g != prev for g, h in cm.bilinear):  # pragma: no cover - see _chain_order
                raise InvalidInputError(f"group {name!r} must follow its coupled group in the chain")
            kw[f"{metric}_per_pair"] = pair
            kw[f"{metric}_per_channel"] = cm.linear.get(name, 0.0)
            kw[f"{metric}_fixed"] = cm.constant if i == 0 else 0.0
        layers.append(LayerBudget(name=name, n_channels=int(flops.channels[name]),
                                  errors=np.asarray(curves[name], dtype=np.float64), **kw))
    return layers


def _allocation_summary(result) -> dict:
    """JSON-ready fields of a :class:`solvers.BudgetResult`."""
    return {"status": str(result.status.value), "objective": float(result.objective),
            "bound": None if result.bound is None else float(result.bound),
            "gap": None if result.gap is None else float(result.gap), "backend": result.backend,
            "ratio": float(result.ratio), "flops_ratio": float(result.flops_ratio),
            "params_ratio": float(result.params_ratio), "solve_time": float(result.solve_time)}
