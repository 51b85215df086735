"""Width allocation over groups with a polynomial cost: the HiGHS MILP against brute-force enumeration."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers.errors import InfeasibleBudgetError, InvalidInputError
from solvers.polynomial_budget import PolynomialCost, allocate_polynomial_budget
from solvers.result import Status


def _instance(seed: int):
    """Four groups: a residual stream r (square term: a conv reading and writing it), two inner groups
    a, b (products with r and with each other), a depthwise-like group d (linear only)."""
    rng = np.random.default_rng(seed)
    units = {"r": 5, "a": 4, "b": 6, "d": 3}
    quad = {("r", "r"): 2.0, ("r", "a"): 3.0, ("a", "b"): 1.5, ("b", "r"): 2.5, ("d", "a"): 1.0}
    lin = {"r": 4.0, "d": 7.0, "b": 1.0}
    curves = {}
    for g, n in units.items():
        steps = np.sort(rng.random(n - 1))[::-1] * rng.uniform(0.2, 2.0)
        curves[g] = np.r_[steps, 0.0] if n > 1 else np.zeros(1)
        curves[g] = np.maximum.accumulate(curves[g][::-1])[::-1]  # non-increasing
    return PolynomialCost(units, 10.0, lin, quad), curves


def _brute(cost, curves, lo, hi):
    best = None
    names = list(cost.units)
    for ws in itertools.product(*[range(1, cost.units[g] + 1) for g in names]):
        w = dict(zip(names, ws))
        c = cost.cost(w)
        e = sum(curves[g][w[g] - 1] for g in names)
        if lo - 1e-9 <= c <= hi + 1e-9 and np.isfinite(e) and (best is None or e < best[1] - 1e-12):
            best = (w, e)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_milp_matches_brute_force_and_lands_in_the_window(seed, target):
    cost, curves = _instance(seed)
    dense = cost.cost({})
    tol = 0.05  # a wide window: the tiny instance has coarse steps
    out = allocate_polynomial_budget(cost, curves, dense, target, tolerance=tol)
    best = _brute(cost, curves, (1 - tol) * target * dense, target * dense)
    if best is None:
        assert out.status == Status.FEASIBLE and "window" in out.info
        return
    assert out.status == Status.OPTIMAL
    assert out.objective == pytest.approx(best[1], abs=1e-7)
    assert (1 - tol) * target <= out.ratio <= target + 1e-12
    assert out.cost == pytest.approx(cost.cost(out.widths))
    assert out.bound is not None and out.bound <= out.objective + 1e-12 and out.gap <= 1e-5


def test_infinite_entries_are_never_chosen():
    cost, curves = _instance(4)
    dense = cost.cost({})
    frozen = {**curves, "b": np.r_[np.full(5, np.inf), 0.0]}
    out = allocate_polynomial_budget(cost, frozen, dense, 0.7, tolerance=0.05)
    assert out.widths["b"] == 6
    best = _brute(cost, frozen, 0.95 * 0.7 * dense, 0.7 * dense)
    assert out.objective == pytest.approx(best[1], abs=1e-7)


def test_unreachable_window_and_bad_input():
    cost, curves = _instance(0)
    dense = cost.cost({})
    floor = cost.cost({g: 1 for g in cost.units}) / dense
    with pytest.raises(InfeasibleBudgetError):
        allocate_polynomial_budget(cost, curves, dense, floor * 0.9)
    # a window of width 0 no integer widths hit: the least error under the target, said so
    out = allocate_polynomial_budget(cost, curves, dense, 0.61234567, tolerance=0.0)
    assert out.status == Status.FEASIBLE and "window" in out.info and out.ratio <= 0.61234567
    with pytest.raises(InvalidInputError, match="entries"):
        allocate_polynomial_budget(cost, {**curves, "a": np.zeros(2)}, dense, 0.5)
    with pytest.raises(InvalidInputError, match="target"):
        allocate_polynomial_budget(cost, curves, dense, 1.5)
