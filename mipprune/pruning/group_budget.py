"""FLOPs and parameter budgets over channel groups: an exact cost polynomial, the reachable floor,
and widths that land a target.

**Cost.** With ``k_g`` kept units in group ``g``, a Conv2d (``groups = 1``) or Linear ``M`` has
``in_M(k) = i_0 + Σ_g a_{M,g} k_g`` input and ``out_M(k) = o_0 + Σ_h b_{M,h} k_h`` output channels
(``a``, ``b``: channels of ``M`` per unit of the group, columns for a Linear after a flatten; ``i_0``,
``o_0``: channels of groups that stay whole), and costs ``c_M · in_M · out_M`` multiply-accumulates
(``c_M = H_out·W_out·kh·kw``, tokens for a Linear) — a product that is bilinear across groups and
quadratic within one (a residual conv reading and writing the same stream). A depthwise / grouped
conv costs ``c_M · (in/groups) · out_M`` (linear). Parameters: weights alike (no spatial factor),
biases and BatchNorm affine parameters linear in their group, everything else constant. FLOPs are
multiply-accumulates as :func:`mipprune.train.count_flops` counts them (``FlopCounterMode`` counts
2 per MAC); the polynomial is exact whenever every unit of a group has the same number of channels
in each layer (always, except for concats that repeat a tensor unevenly: then it is checked at full
width and :func:`measure_cost` reports the truth).

**Floor.** Every coefficient is non-negative, so the cheapest network keeps one unit per prunable
group: :meth:`GroupCost.floor` is known before any calibration, and an unreachable target fails at
once, naming the groups that stay whole and why.

**Widths.** :func:`solve_group_widths` chooses the widths minimizing the summed error curves under
the exact cost, as a MILP on HiGHS (:func:`solvers.polynomial_budget.allocate_polynomial_budget`:
one-hot widths, products linearized only for the pairs of groups a layer couples), time-boxed,
with its status, objective, bound and proven gap; :func:`allocate_group_widths` (greedy, no gap) is
its warm start and what remains if HiGHS stops on its time limit before finding anything (status
TIME_LIMIT). :func:`uniform_widths` keeps the same fraction of every prunable group, found by
bisection, then adds single units (cheapest first) while the cost stays under the target, so that
the result lands in ``[(1 − tolerance)·target, target]`` whenever the unit granularity allows.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mipprune.pruning.budget import _macs, polynomial_cost
from mipprune.pruning.channel_graph import ChannelGraph
from solvers.errors import InfeasibleBudgetError, InvalidInputError

__all__ = ["GroupCost", "group_cost", "uniform_widths", "allocate_group_widths", "solve_group_widths", "measure_cost",
           "DEFAULT_BUDGET_TIME_LIMIT"]

#: Seconds HiGHS may spend on a width allocation when the caller gives no limit.
DEFAULT_BUDGET_TIME_LIMIT = 30.0


@dataclass
class GroupCost:
    """``cost(k) = constant + Σ_g linear[g]·k_g + Σ_{(g,h)} quadratic[(g,h)]·k_g·k_h`` over group names.

    Attributes
    ----------
    metric : "flops" or "params"
    units : {group name: n_units} of the prunable groups
    dense : float — the dense model's total (``cost`` at full widths)
    fixed : {group name: reasons} of the groups that stay whole (with channels in some layer)
    """

    metric: str
    units: dict[str, int]
    constant: float
    linear: dict[str, float]
    quadratic: dict[tuple[str, str], float]
    dense: float
    fixed: dict[str, list[str]]

    def cost(self, widths: dict[str, int] | None = None) -> float:
        return polynomial_cost(self.units, self.constant, self.linear, self.quadratic, widths)

    def ratio(self, widths: dict[str, int] | None = None) -> float:
        return self.cost(widths) / self.dense

    def floor(self) -> float:
        """Smallest reachable ratio: one unit kept in every prunable group."""
        return self.ratio({g: 1 for g in self.units})

    def check_reachable(self, target: float) -> None:
        """:class:`InfeasibleBudgetError` if ``target`` (fraction kept) is below :meth:`floor`."""
        floor = self.floor()
        if target < floor:
            why = "; ".join(f"{g}: {', '.join(r)}" for g, r in list(self.fixed.items())[:12])
            raise InfeasibleBudgetError(
                f"{self.metric} must be >= {floor:.4f} (one unit kept in each of the {len(self.units)} prunable "
                f"groups; the rest stays whole); got {target:g}. Groups that stay whole: {why or 'none'}")


def _macs_per_module(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per (input channel · output channel) — or per output channel for grouped
    convs — of each Conv2d / Linear, one sample (from :func:`mipprune.pruning.budget._macs`)."""
    mods = dict(model.named_modules())
    out = {}
    for name, macs in _macs(model, example).items():
        m = mods[name]
        if isinstance(m, nn.Conv2d):
            out[name] = macs / (m.out_channels if m.groups != 1 else m.in_channels * m.out_channels)
        else:
            out[name] = macs / (m.in_features * m.out_features)
    return out


def _sides(graph: ChannelGraph, prunable: set[str]):
    """Per module and side ("in"/"out"): (channels that stay, {group: channels per unit})."""
    sides: dict[tuple[str, str], list] = {}
    for g in graph.groups:
        for m in g.members:
            keys = {"producer": ["out"], "batchnorm": ["out"], "grouped": ["out"], "consumer": ["in"]}[m.role]
            for side in keys:
                entry = sides.setdefault((m.module, side), [0.0, defaultdict(float)])
                n = float((m.units >= 0).sum()) * (m.columns_per_channel if side == "in" else 1)
                if g.name in prunable:
                    entry[1][g.name] += n / g.n_units
                else:
                    entry[0] += n
    return sides


def group_cost(model: nn.Module, graph: ChannelGraph, example: torch.Tensor, metric: str = "flops",
               groups: list[str] | None = None) -> GroupCost:
    """The :class:`GroupCost` of ``model`` over the widths of its prunable groups (or of ``groups``,
    a subset of their names; the others count as whole)."""
    from mipprune.train import count_flops, count_params

    if metric not in ("flops", "params"):
        raise InvalidInputError(f"metric must be 'flops' or 'params'; got {metric!r}")
    prunable = {g.name for g in graph.prunable} if groups is None else set(groups)
    units = {g.name: g.n_units for g in graph.prunable if g.name in prunable}
    sides = _sides(graph, set(units))
    mods = dict(model.named_modules())
    const, lin, quad = 0.0, defaultdict(float), defaultdict(float)

    def add_product(c: float, a: tuple, b: tuple) -> None:
        nonlocal const
        (a0, ag), (b0, bg) = a, b
        const += c * a0 * b0
        for g, x in ag.items():
            lin[g] += c * x * b0
        for h, y in bg.items():
            lin[h] += c * a0 * y
        for g, x in ag.items():
            for h, y in bg.items():
                quad[tuple(sorted((g, h)))] += c * x * y

    def side(name: str, which: str, full: int) -> tuple:
        entry = sides.get((name, which))
        if entry is None:
            return float(full), {}
        return entry[0], dict(entry[1])

    modeled = 0.0
    if metric == "flops":
        per = _macs_per_module(model, example)
        for name, c in per.items():
            m = mods[name]
            n_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            out = side(name, "out", n_out)
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                add_product(c, (1.0, {}), out)
            else:
                n_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features
                inn = side(name, "in", n_in)
                # conv "in" counts columns (channels·kh·kw): c is per output position already
                if isinstance(m, nn.Conv2d):
                    c = c / (m.kernel_size[0] * m.kernel_size[1])
                add_product(c, inn, out)
        dense = float(count_flops(model, tuple(example.shape[1:])))
    else:
        for name, m in mods.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                out = side(name, "out", n_out)
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    add_product(float(m.weight[0].numel()), (1.0, {}), out)
                else:
                    n_in = m.weight[0].numel()
                    add_product(1.0, side(name, "in", n_in), out)
                modeled += m.weight.numel()
                if m.bias is not None:
                    add_product(1.0, (1.0, {}), out)
                    modeled += m.bias.numel()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (name, "out") in sides:
                for p in m.parameters(recurse=False):
                    add_product(1.0, (1.0, {}), side(name, "out", m.num_features))
                    modeled += p.numel()
        dense = float(count_params(model))
        const += dense - modeled
    fixed = {g.name: (g.fixed or ["a single unit" if g.n_units <= 1 else "no consumer"])
             for g in graph.groups if g.name not in units and any(m.role != "consumer" for m in g.members)}
    cost = GroupCost(metric=metric, units=units, constant=const, linear=dict(lin), quadratic=dict(quad),
                     dense=dense, fixed=fixed)
    full = cost.cost()
    if not abs(full - dense) <= 1e-6 * max(dense, 1.0):
        raise InvalidInputError(f"the {metric} cost polynomial must reproduce the dense total {dense:g}; got {full:g} "
                                "(a layer the analysis does not model)")
    return cost


def uniform_widths(cost: GroupCost, target: float, tolerance: float = 0.005) -> dict[str, int]:
    """Widths keeping about the same fraction of every group with ``ratio`` in
    ``[(1 − tolerance)·target, target]`` when the units allow (else the largest ratio ≤ target).

    Raises :class:`InfeasibleBudgetError` below the floor."""
    if not 0 < target <= 1:
        raise InvalidInputError(f"{cost.metric} must be in (0, 1]; got {target}")
    cost.check_reachable(target)
    if cost.ratio() <= target:
        return dict(cost.units)

    def widths_at(r: float) -> dict[str, int]:
        return {g: max(1, min(n, int(np.floor(r * n)))) for g, n in cost.units.items()}

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if cost.ratio(widths_at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    widths = widths_at(lo)
    # fill: add the unit that raises the cost least while staying under the target
    while cost.ratio(widths) < (1.0 - tolerance) * target:
        best, best_ratio = None, None
        for g, n in cost.units.items():
            if widths[g] < n:
                r = cost.ratio({**widths, g: widths[g] + 1})
                if r <= target and (best_ratio is None or r < best_ratio):
                    best, best_ratio = g, r
        if best is None:
            break
        widths[best] += 1
    return widths


def allocate_group_widths(cost: GroupCost, curves: dict[str, np.ndarray], target: float,
                          tolerance: float = 0.005) -> dict[str, int]:
    """Widths minimizing ``Σ_g curves[g][k_g − 1]`` (approximately) with ``ratio ≤ target``.

    Greedy on the exact cost polynomial: from full widths, remove the unit with the smallest error
    increase per unit of cost saved until the target is met, then add back the units with the
    largest error decrease per cost that still fit, until the ratio is in the window (or nothing
    fits). ``curves[g]``: error (non-increasing) of keeping ``k = 1 … n_g`` units; ``inf`` entries
    are never chosen (a group that must stay whole). No optimality gap is claimed.
    """
    if not 0 < target <= 1:
        raise InvalidInputError(f"{cost.metric} must be in (0, 1]; got {target}")
    cost.check_reachable(target)
    names = list(cost.units)
    if not names:
        return {}
    n = np.array([cost.units[g] for g in names], dtype=np.int64)
    index = {g: i for i, g in enumerate(names)}
    lin = np.array([cost.linear.get(g, 0.0) for g in names])
    A = np.zeros((len(names), len(names)))
    for (g, h), c in cost.quadratic.items():
        A[index[g], index[h]] += c
    err = []
    for g in names:
        c = np.asarray(curves[g], dtype=np.float64)
        if c.shape != (cost.units[g],):
            raise InvalidInputError(f"curves[{g!r}] must have {cost.units[g]} entries (k = 1 … n); got {c.shape}")
        err.append(c)
    w = n.copy()
    total = cost.cost()
    hi, lo = target * cost.dense, (1.0 - tolerance) * target * cost.dense

    def saving(w):  # cost(w) − cost(w − e_i), exactly
        return lin + A @ w + A.T @ w - np.diag(A)

    def err_at(i, k):
        return err[i][k - 1]

    while total > hi:
        s = saving(w)
        best, best_score, land, land_score = -1, np.inf, -1, np.inf
        for i in np.flatnonzero(w > 1):
            de = err_at(i, w[i] - 1) - err_at(i, w[i])
            if not np.isfinite(de) or s[i] <= 0:
                continue
            score = max(de, 0.0) / s[i]
            if score < best_score:
                best, best_score = i, score
            if lo <= total - s[i] <= hi and score < land_score:  # a last step that lands in the window
                land, land_score = i, score
        if land >= 0 and total - s[best] < lo:
            best = land  # the cheapest step would overshoot below the window
        if best < 0:
            break
        total -= s[best]
        w[best] -= 1
    while total < lo:
        s_add = lin + A @ w + A.T @ w + np.diag(A)  # cost(w + e_i) − cost(w)
        best, best_score = -1, -np.inf
        for i in np.flatnonzero(w < n):
            if total + s_add[i] > hi:
                continue
            gain = err_at(i, w[i]) - err_at(i, w[i] + 1)
            score = gain / max(s_add[i], 1e-300)
            if score > best_score:
                best, best_score = i, score
        if best < 0:
            break
        total += s_add[best]
        w[best] += 1
    return {g: int(w[i]) for i, g in enumerate(names)}


def solve_group_widths(cost: GroupCost, curves: dict[str, np.ndarray], target: float, tolerance: float = 0.005,
                       time_limit: float | None = DEFAULT_BUDGET_TIME_LIMIT):
    """Widths minimizing ``Σ_g curves[g][k_g − 1]`` with ``ratio`` in ``[(1 − tolerance)·target, target]``,
    with a proven gap: a :class:`solvers.polynomial_budget.WidthAllocation` (``widths``, ``status``,
    ``objective``, ``bound``, ``gap``, ``source``: "milp", or "start" when the greedy warm start of
    :func:`allocate_group_widths` is kept). ``inf`` entries of a curve are never chosen.

    Raises :class:`InfeasibleBudgetError` below the floor (before any solve)."""
    from solvers.polynomial_budget import PolynomialCost, allocate_polynomial_budget

    if not 0 < target <= 1:
        raise InvalidInputError(f"{cost.metric} must be in (0, 1]; got {target}")
    cost.check_reachable(target)
    start = allocate_group_widths(cost, curves, target, tolerance)
    poly = PolynomialCost(units=cost.units, constant=cost.constant, linear=cost.linear, quadratic=cost.quadratic)
    return allocate_polynomial_budget(poly, curves, cost.dense, target, tolerance=tolerance, time_limit=time_limit,
                                      start=start)


def measure_cost(model: nn.Module, example: torch.Tensor, metric: str) -> float:
    """The pruned model's FLOPs (multiply-accumulates, one sample) or parameters."""
    from mipprune.train import count_flops, count_params

    return float(count_flops(model, tuple(example.shape[1:])) if metric == "flops" else count_params(model))
