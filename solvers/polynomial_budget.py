"""Width allocation over channel groups whose cost is a polynomial of degree two in the widths, with a
proven optimality gap.

Each group ``g`` keeps ``k_g ∈ {1 … n_g}`` units; keeping ``k`` costs ``errors[g][k − 1]`` (its error
curve; ``inf`` = not allowed) and the network costs

    cost(k) = constant + Σ_g linear[g]·k_g + Σ_(g,h) quadratic[(g,h)]·k_g·k_h

(a conv between groups ``a`` and ``b`` gives a product ``k_a·k_b``, a conv reading and writing the same
stream a square ``k_a²``, a depthwise conv a linear term). We minimize ``Σ_g errors[g][k_g − 1]``
subject to ``(1 − tolerance)·target·dense ≤ cost(k) ≤ target·dense``.

**MILP (HiGHS).** One-hot binaries ``x_{g,k}`` (``k_g = Σ k·x_{g,k}``). A square is linear in them
(``k_g² = Σ k²·x_{g,k}``). A product of two groups is linearized only for the pairs that exist, in the
aggregated form: with the one-hot on the group ``a`` with fewer units, ``u_{ab,k} = k_b·x_{a,k}``
(``Σ_k u_{ab,k} = k_b``, ``x_{a,k} ≤ u_{ab,k} ≤ n_b·x_{a,k}``, and for small pairs the McCormick rows
``k_b − n_b(1 − x_{a,k}) ≤ u_{ab,k} ≤ k_b − (1 − x_{a,k})``), so ``k_a·k_b = Σ_k k·u_{ab,k}`` exactly
at every integer point: ``n_a`` continuous columns per coupled pair, not ``n_a·n_b``. That alone is
a weak relaxation (a fractional one-hot of ``a`` can pair its small widths with ``b``'s large ones
while ``b``'s errors are paid on its own marginal), so each pair also gets a *binned transport*:
``z_pq ≥ 0`` for the ``bins × bins`` pairs of width bins (``BINS``, fewer with many pairs), with the
bins' one-hot masses as marginals, and the valid row ``Σ_k k·u_{ab,k} ≥ Σ_pq lo_p·lo_q·z_pq`` (at an
integer point the product is at least the product of its bins' smallest widths). On torchvision
cost polynomials this lifts the root bound (ResNet-18 at 25 % FLOPs: gap 17 % → 13 % with 16 bins).
HiGHS proves the bound and the gap; a time limit gives ``TIME_LIMIT`` with the best allocation found
(the warm start, if it found none) and the bound it proved (``benchmarks/bench_group_budget.py``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from solvers.errors import InfeasibleBudgetError, InvalidInputError, SolverError
from solvers.result import Status, relative_gap

__all__ = ["PolynomialCost", "WidthAllocation", "allocate_polynomial_budget"]

# Pairs with at most this many (n_a · n_b) get the two McCormick rows per width (tighter relaxation);
# larger ones only the aggregated rows, which are exact at integer points anyway.
MCCORMICK_MAX_PRODUCT = 20_000
# Width bins per group of the transport rows that tie each coupled pair's product to a joint
# distribution of the two widths (0 or 1: none), fewer when many pairs would make the LP heavy:
# at most about TRANSPORT_COLUMNS z columns in all.
BINS = 16
TRANSPORT_COLUMNS = 40_000


@dataclass(frozen=True)
class PolynomialCost:
    """``cost(k) = constant + Σ linear[g]·k_g + Σ quadratic[(g,h)]·k_g·k_h`` over ``units`` {g: n_g}."""

    units: Mapping[str, int]
    constant: float
    linear: Mapping[str, float]
    quadratic: Mapping[tuple[str, str], float]

    def cost(self, widths: Mapping[str, int]) -> float:
        w = {**self.units, **widths}
        total = self.constant + sum(c * w[g] for g, c in self.linear.items())
        return total + sum(c * w[g] * w[h] for (g, h), c in self.quadratic.items())


@dataclass
class WidthAllocation:
    """Outcome of :func:`allocate_polynomial_budget`.

    ``objective``: Σ errors at ``widths`` (float64, recomputed); ``bound``: proven lower bound on the
    optimum (``None``: none proven); ``status``: OPTIMAL (within ``mip_gap``), TIME_LIMIT (best found
    when the limit hit) or FEASIBLE (the window is unreachable at unit granularity: the largest cost
    below it); ``ratio``: cost / dense; ``source``: "milp" or "start" (the warm start was kept).
    """

    widths: dict[str, int]
    objective: float
    bound: float | None
    gap: float | None
    status: Status
    cost: float
    ratio: float
    solve_time: float
    backend: str = "highs"
    source: str = "milp"
    info: dict = field(default_factory=dict)


def _check(cost: PolynomialCost, errors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for g, n in cost.units.items():
        if g not in errors:
            raise InvalidInputError(f"errors must hold a curve for every group; got none for {g!r}")
        e = np.asarray(errors[g], dtype=np.float64).reshape(-1)
        if e.shape != (n,):
            raise InvalidInputError(f"errors[{g!r}] must have {n} entries (k = 1 … {n}); got {e.shape}")
        if np.isnan(e).any() or np.isneginf(e).any():
            raise InvalidInputError(f"errors[{g!r}] must be finite or +inf; got NaN or -inf")
        if not np.isfinite(e[-1]):
            raise InvalidInputError(f"errors[{g!r}] must be finite at full width; got inf")
        out[g] = e
    for (g, h), c in cost.quadratic.items():
        if g not in cost.units or h not in cost.units or not (math.isfinite(c) and c >= 0):
            raise InvalidInputError(f"quadratic[({g!r}, {h!r})] must couple known groups with a finite "
                                    f"coefficient >= 0; got {c}")
    for g, c in cost.linear.items():
        if g not in cost.units or not math.isfinite(c):
            raise InvalidInputError(f"linear[{g!r}] must belong to a known group and be finite; got {c}")
    return out


def allocate_polynomial_budget(cost: PolynomialCost, errors: Mapping[str, np.ndarray], dense: float, target: float,
                               *, tolerance: float = 0.005, time_limit: float | None = 30.0,
                               start: Mapping[str, int] | None = None, mip_gap: float = 1e-6) -> WidthAllocation:
    """Widths minimizing ``Σ_g errors[g][k_g − 1]`` with ``cost(k)/dense`` in ``[(1 − tolerance)·target, target]``.

    Parameters
    ----------
    cost : PolynomialCost
    errors : {group: array (n_g,)}
        Error of keeping ``k = 1 … n_g`` units (``inf``: that width is not allowed).
    dense : float
        The cost at full widths (> 0).
    target : float in (0, 1]
    tolerance : float in [0, 1)
    time_limit : float, optional
        Seconds for HiGHS (``None``: no limit).
    start : {group: width}, optional
        An allocation with cost ≤ target (e.g. a greedy one): offered to HiGHS as its incumbent when it
        lies in the window, and kept, with status TIME_LIMIT, if the solver stops on its time limit
        before finding any (``info["window"]`` says so if it lies below the window).
    mip_gap : float
        Relative gap at which HiGHS stops as OPTIMAL.

    Raises
    ------
    InfeasibleBudgetError
        When no allowed widths have ``cost ≤ target·dense``.
    SolverError
        When HiGHS stops without any allocation and no ``start`` was given.
    """
    from solvers.milp import MilpModel, solve_highs

    t0 = time.perf_counter()
    if not 0 < target <= 1:
        raise InvalidInputError(f"target must be in (0, 1]; got {target}")
    if not 0 <= tolerance < 1:
        raise InvalidInputError(f"tolerance must be in [0, 1); got {tolerance}")
    if not dense > 0:
        raise InvalidInputError(f"dense must be > 0; got {dense}")
    curves = _check(cost, errors)
    names = list(cost.units)
    n = {g: int(cost.units[g]) for g in names}
    hi = target * dense
    lo = (1.0 - tolerance) * hi
    # ----------------------------------------------------------------- columns: one-hots, then products
    off, ncol = {}, 0
    for g in names:
        off[g], ncol = ncol, ncol + n[g]
    ks = {g: np.arange(1, n[g] + 1, dtype=np.float64) for g in names}
    obj = np.zeros(ncol)
    col_upper = np.ones(ncol)
    for g in names:
        e = curves[g]
        allowed = np.isfinite(e)
        obj[off[g]:off[g] + n[g]] = np.where(allowed, e, 0.0)
        col_upper[off[g]:off[g] + n[g]] = allowed
    integrality = np.ones(ncol, dtype=np.int8)
    budget = np.zeros(ncol)                              # the window row's coefficients
    const = float(cost.constant)
    for g, c in cost.linear.items():
        budget[off[g]:off[g] + n[g]] += c * ks[g]
    rows, cols, vals, rlo, rhi = [], [], [], [], []
    nrow = 0

    def add_rows(r_idx, c_idx, v, lower, upper):
        nonlocal nrow
        rows.append(np.asarray(r_idx, np.int64) + nrow)
        cols.append(np.asarray(c_idx, np.int64))
        vals.append(np.asarray(v, np.float64))
        rlo.append(np.asarray(lower, np.float64))
        rhi.append(np.asarray(upper, np.float64))
        nrow += len(rlo[-1])

    for g in names:                                      # one-hot
        add_rows(np.zeros(n[g]), off[g] + np.arange(n[g]), np.ones(n[g]), [1.0], [1.0])
    products = []
    extra_upper, extra_budget = [], []  # continuous columns after the one-hots: bounds, window row
    n_pairs = sum(1 for (g, h), c in cost.quadratic.items() if c and g != h)
    bins = min(BINS, int(math.sqrt(TRANSPORT_COLUMNS / max(n_pairs, 1))))
    for (g, h), c in cost.quadratic.items():
        if c == 0:
            continue
        if g == h:
            budget[off[g]:off[g] + n[g]] += c * ks[g] ** 2
            continue
        a, b = (g, h) if n[g] <= n[h] else (h, g)      # one-hot of a times the width of b
        na, nb = n[a], n[b]
        u = ncol + np.arange(na)
        ncol += na
        extra_upper.append(np.full(na, float(nb)))
        extra_budget.append(c * ks[a])
        xa, xb = off[a] + np.arange(na), off[b] + np.arange(nb)
        # Σ_k u_k − Σ_j j·x_{b,j} = 0
        add_rows(np.zeros(na + nb), np.r_[u, xb], np.r_[np.ones(na), -ks[b]], [0.0], [0.0])
        # u_k − n_b·x_{a,k} ≤ 0 and u_k − x_{a,k} ≥ 0
        r = np.repeat(np.arange(na), 2)
        add_rows(r, np.c_[u, xa].ravel(), np.c_[np.ones(na), -nb * np.ones(na)].ravel(),
                 np.full(na, -np.inf), np.zeros(na))
        add_rows(r, np.c_[u, xa].ravel(), np.c_[np.ones(na), -np.ones(na)].ravel(), np.zeros(na), np.full(na, np.inf))
        if na * nb <= MCCORMICK_MAX_PRODUCT:
            # u_k − k_b − n_b·x_{a,k} ≥ −n_b   and   u_k − k_b − x_{a,k} ≤ −1
            r = np.repeat(np.arange(na), 2 + nb)
            cidx = np.c_[u, xa, np.tile(xb, (na, 1))].ravel()
            for coef, lower, upper in ((-nb, -float(nb), np.inf), (-1.0, -np.inf, -1.0)):
                v = np.tile(np.r_[1.0, coef, -ks[b]], na)
                add_rows(r, cidx, v, np.full(na, lower), np.full(na, upper))
        if bins > 1 and min(na, nb) > 1:
            # transport between width bins: z_pq = P(a in bin p, b in bin q), marginals the one-hots'
            # bin masses; at every integer point k_a·k_b ≥ lo_p·lo_q of its bin pair, so the row
            # Σ_k k·u_k ≥ Σ_pq lo_p·lo_q·z_pq is valid and ties the product to a joint distribution
            pa, pb_ = (np.unique((np.arange(nn_) * bins) // nn_, return_inverse=True)[1] for nn_ in (na, nb))
            Ba, Bb = int(pa.max()) + 1, int(pb_.max()) + 1
            lo_a = np.array([ks[a][pa == p].min() for p in range(Ba)])
            lo_b = np.array([ks[b][pb_ == q].min() for q in range(Bb)])
            z = ncol + np.arange(Ba * Bb)
            ncol += Ba * Bb
            extra_upper.append(np.ones(Ba * Bb))
            extra_budget.append(np.zeros(Ba * Bb))
            add_rows(np.r_[np.repeat(np.arange(Ba), Bb), pa], np.r_[z, xa], np.r_[np.ones(Ba * Bb), -np.ones(na)],
                     np.zeros(Ba), np.zeros(Ba))                      # Σ_q z_pq = mass of a's bin p
            add_rows(np.r_[np.tile(np.arange(Bb), Ba), pb_], np.r_[z, xb], np.r_[np.ones(Ba * Bb), -np.ones(nb)],
                     np.zeros(Bb), np.zeros(Bb))                      # Σ_p z_pq = mass of b's bin q
            add_rows(np.zeros(na + Ba * Bb), np.r_[u, z], np.r_[ks[a], -np.outer(lo_a, lo_b).ravel()], [0.0], [np.inf])
        products.append((a, b, u))
    n_binary = budget.size
    budget = np.concatenate([budget, *extra_budget])
    obj = np.r_[obj, np.zeros(ncol - n_binary)]
    integrality = np.r_[integrality, np.zeros(ncol - n_binary, np.int8)]
    scale = max(hi, 1.0)                                 # the window row in units of the budget
    nz = np.flatnonzero(budget)
    add_rows(np.zeros(nz.size), nz, budget[nz] / scale, [(lo - const) / scale], [(hi - const) / scale])
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nrow, ncol))
    col_lower = np.zeros(ncol)
    col_upper = np.concatenate([col_upper, *extra_upper])
    empty = sp.csr_matrix((0, ncol))
    model = MilpModel(cost=obj, offset=0.0, A=A, row_lower=np.concatenate(rlo), row_upper=np.concatenate(rhi),
                      col_lower=col_lower, col_upper=col_upper, integrality=integrality,
                      x_cols=np.zeros(0, np.int64), unit_cols=[], binary_cols=[], out_map=(empty, np.zeros(0)))

    def vector(widths):
        v = np.zeros(ncol)
        for g in names:
            v[off[g] + widths[g] - 1] = 1.0
        for a, b, u in products:
            v[u[widths[a] - 1]] = widths[b]
        return v

    def objective_of(widths):
        return float(sum(curves[g][widths[g] - 1] for g in names))

    start_ok, fallback = None, None
    if start is not None:
        fallback = {g: int(start[g]) for g in names}
        c0 = cost.cost(fallback)
        if c0 > hi * (1 + 1e-9) or not np.isfinite(objective_of(fallback)):
            fallback = None       # over the target: no use at all
        elif c0 >= lo * (1 - 1e-9):
            start_ok = fallback   # in the window: offered to HiGHS as its first incumbent
    build_time = time.perf_counter() - t0
    if time_limit is not None:
        time_limit = max(time_limit - build_time, 0.1)  # the limit covers building the model too
    sol = solve_highs(model, time_limit=time_limit, start=None if start_ok is None else vector(start_ok),
                      options={"mip_rel_gap": float(mip_gap), "mip_abs_gap": 1e-9})
    info = {"build_time": build_time, "bins": bins, "binaries": int(sum(n.values())),
            "product_columns": int(ncol - sum(n.values())),
            "rows": int(nrow), "nonzeros": int(A.nnz), "mip_nodes": int(sol.nodes), "raw_status": sol.raw_status}
    if sol.status == Status.INFEASIBLE and lo > 0:
        # the window is narrower than the unit granularity allows (HiGHS proved it): the least error
        # with cost <= target instead, said in the status (FEASIBLE) and in info["window"]
        model.row_lower[-1] = -np.inf
        sol = solve_highs(model, time_limit=time_limit, options={"mip_rel_gap": float(mip_gap), "mip_abs_gap": 1e-9})
        info["window"] = (f"no widths land in [{(1 - tolerance) * target:.6g}, {target:.6g}] of the dense cost "
                          "(proven infeasible): the least error with cost <= target instead")
        lo = -np.inf
    if sol.status == Status.INFEASIBLE:
        raise InfeasibleBudgetError(f"no allowed widths cost at most {target:g} of the dense total")
    if sol.values is not None:
        values = sol.values
        widths = {g: int(np.argmax(values[off[g]:off[g] + n[g]])) + 1 for g in names}
        source = "milp"
    elif fallback is not None:
        widths, source = dict(fallback), "start"
        if fallback is not start_ok:
            info["window"] = (f"the time limit stopped HiGHS before it found widths in the window; the warm start "
                              f"kept lands at {cost.cost(fallback) / dense:.6g} of the dense cost, below "
                              f"{lo / dense:.6g}")
    else:
        raise SolverError(f"HiGHS found no width allocation before stopping ({sol.raw_status}); give a "
                          "longer time limit")
    status = {Status.OPTIMAL: Status.OPTIMAL, Status.TIME_LIMIT: Status.TIME_LIMIT}.get(sol.status)
    if status is None:
        status = Status.TIME_LIMIT if source == "start" else sol.status
    if "window" in info and status == Status.OPTIMAL:
        status = Status.FEASIBLE  # optimal for cost <= target, but outside the requested window
    objective = objective_of(widths)
    if source == "milp" and start_ok is not None and objective_of(start_ok) < objective:
        widths, objective, source = dict(start_ok), objective_of(start_ok), "start"
    total = cost.cost(widths)
    if not ((lo * (1 - 1e-9) - 1e-9 <= total or "window" in info) and total <= hi * (1 + 1e-9) + 1e-9):
        raise SolverError(f"HiGHS returned widths with cost ratio {total / dense:.6g} outside "
                          f"[{lo / dense:.6g}, {hi / dense:.6g}] (numerical trouble)")
    bound = None if sol.bound is None else min(float(sol.bound), objective)
    return WidthAllocation(widths=widths, objective=objective, bound=bound, gap=relative_gap(objective, bound),
                           status=status, cost=total, ratio=total / dense, solve_time=time.perf_counter() - t0,
                           source=source, info=info)
