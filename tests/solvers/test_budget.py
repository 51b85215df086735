"""Network-wide width allocation: HiGHS MILP and CP-SAT agree with brute-force enumeration."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers import InfeasibleBudgetError, InvalidInputError, SolverNotAvailableError, Status, allocate_budget
from solvers.budget import BudgetResult, LayerBudget, total_cost, total_error


def brute_force_allocation(layers, target, *, metric="flops", tolerance=0.005):
    """Enumerate every width combination: the optimum (widths, objective), or None if none fits."""
    dense = total_cost(layers, [L.n_channels for L in layers], metric)
    hi = target * dense
    lo = (1 - tolerance) * hi
    ranges = [range(1, L.n_channels + 1) if L.prunable else [L.n_channels] for L in layers]
    best = None
    for ws in itertools.product(*ranges):
        tot = total_cost(layers, ws, metric)
        if lo - 1e-9 <= tot <= hi + 1e-9:
            e = total_error(layers, ws)
            if best is None or e < best[1]:
                best = ({L.name: w for L, w in zip(layers, ws)}, e)
    return best


def error_curve(C: int, rng) -> np.ndarray:
    """A decreasing, convex-ish error curve err[k-1], k = 1..C, ending at a small floor."""
    drops = np.sort(rng.exponential(size=C))[::-1]
    curve = np.cumsum(drops[::-1])[::-1] / drops.sum()      # from 1 down to drops[-1]/sum
    return curve * rng.uniform(0.3, 1.0) + rng.uniform(0, 0.01)


def small_chain(seed: int, n_layers: int = 3, max_width: int = 10):
    """A conv chain: fixed 3-channel input, prunable middle layers, an unprunable 5-class head."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n_layers):
        C = int(rng.integers(4, max_width + 1))
        layers.append(LayerBudget.conv(f"conv{i}", error_curve(C, rng), out_channels=C, kernel_size=3,
                                       out_hw=(8 // (1 + i // 2), 8 // (1 + i // 2)),
                                       in_channels=3 if i == 0 else None))
    layers.append(LayerBudget.linear("fc", None, out_features=5, prunable=False))
    return layers


CASES = [(seed, n, target) for seed, n, target in
         [(0, 3, 0.5), (1, 3, 0.3), (2, 4, 0.6), (3, 4, 0.4), (4, 3, 0.8), (5, 4, 0.25)]]


@pytest.mark.parametrize("seed, n_layers, target", CASES)
def test_both_backends_find_the_brute_force_optimum(seed, n_layers, target):
    layers = small_chain(seed, n_layers, max_width=12 if n_layers == 3 else 8)
    tol = 0.05  # a wider window than the default keeps small discrete chains feasible
    truth = brute_force_allocation(layers, target, tolerance=tol)
    assert truth is not None
    results = [allocate_budget(layers, target, backend=b, tolerance=tol) for b in ("highs", "cpsat")]
    for res in results:
        assert isinstance(res, BudgetResult)
        assert res.status is Status.OPTIMAL
        assert res.objective == pytest.approx(truth[1], abs=1e-5)   # CP-SAT optimizes errors rounded at 1e-6
        assert res.bound is not None and res.bound <= truth[1] + 1e-9
        assert (1 - tol) * target - 1e-9 <= res.ratio <= target + 1e-9
        # the reported numbers are recomputed from the widths
        ws = [res.widths[L.name] for L in layers]
        assert res.objective == pytest.approx(total_error(layers, ws), abs=1e-12)
        assert res.flops == pytest.approx(total_cost(layers, ws, "flops"))
        assert res.widths["fc"] == 5
    assert results[0].objective == pytest.approx(results[1].objective, abs=1e-5)


def test_params_metric_respects_its_own_window():
    layers = small_chain(7, 3, max_width=10)
    truth = brute_force_allocation(layers, 0.5, metric="params", tolerance=0.05)
    for backend in ("highs", "cpsat"):
        res = allocate_budget(layers, 0.5, metric="params", backend=backend, tolerance=0.05)
        assert res.metric == "params"
        assert 0.475 - 1e-9 <= res.params_ratio <= 0.5 + 1e-9
        assert res.objective == pytest.approx(truth[1], abs=1e-5)


def test_target_one_keeps_every_channel():
    layers = small_chain(3, 4, max_width=8)
    for backend in ("highs", "cpsat"):
        res = allocate_budget(layers, 1.0, backend=backend)
        assert res.widths == {L.name: L.n_channels for L in layers}
        assert res.ratio == pytest.approx(1.0)


def test_default_window_half_a_percent_on_a_wider_chain():
    rng = np.random.default_rng(11)
    widths = [32, 48, 64]
    layers = [LayerBudget.conv(f"c{i}", error_curve(C, rng), out_channels=C, kernel_size=3, out_hw=(16, 16),
                               in_channels=3 if i == 0 else None) for i, C in enumerate(widths)]
    res_h = allocate_budget(layers, 0.5, backend="highs")
    res_c = allocate_budget(layers, 0.5, backend="cpsat", time_limit=30)
    for res in (res_h, res_c):
        assert 0.5 * 0.995 - 1e-12 <= res.ratio <= 0.5 + 1e-12
    assert res_h.status is Status.OPTIMAL
    if res_c.status is Status.OPTIMAL:
        assert res_c.objective == pytest.approx(res_h.objective, abs=1e-5)
    # keeping half the FLOPs of a 3-layer chain must hurt less than shrinking every layer to half width
    half = [C // 2 for C in widths]
    assert res_h.objective <= total_error(layers, half) + 1e-12 or total_cost(layers, half) > 0.5 * total_cost(layers, widths)


def test_out_of_range_target_and_infeasible_windows_raise():
    layers = small_chain(0, 3)
    with pytest.raises(InvalidInputError, match=r"target must be in \(0, 1\]; got 1.5"):
        allocate_budget(layers, 1.5)
    with pytest.raises(InvalidInputError, match=r"target must be in \(0, 1\]; got 0"):
        allocate_budget(layers, 0)
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        allocate_budget(layers, 1e-4)
    # a window too narrow for any discrete allocation (but above the minimum ratio)
    tiny = [LayerBudget.linear("a", [1.0, 0.5, 0.0], out_features=3, in_features=1),
            LayerBudget.linear("b", [1.0, 0.0], out_features=2)]
    dense = total_cost(tiny, [3, 2])
    feasible = {total_cost(tiny, ws) / dense for ws in itertools.product([1, 2, 3], [1, 2])}
    target = 0.5 * (sorted(feasible)[1] + sorted(feasible)[2])   # strictly between two achievable ratios
    for backend in ("highs", "cpsat"):
        with pytest.raises(InfeasibleBudgetError, match="no width allocation"):
            allocate_budget(tiny, target, backend=backend, tolerance=1e-6)


def test_bad_inputs_are_rejected_with_clear_messages():
    with pytest.raises(InvalidInputError, match=r"errors of layer 'x' must have shape \(4,\)"):
        LayerBudget("x", 4, np.ones(3))
    with pytest.raises(InvalidInputError, match="errors of prunable layer 'x' must be given"):
        LayerBudget("x", 4)
    with pytest.raises(InvalidInputError, match="must be finite and >= 0"):
        LayerBudget("x", 2, [1.0, 0.0], flops_per_pair=-1)
    layers = small_chain(1, 3)
    with pytest.raises(InvalidInputError, match="metric must be one of"):
        allocate_budget(layers, 0.5, metric="latency")
    with pytest.raises(SolverNotAvailableError, match="backend must be one of"):
        allocate_budget(layers, 0.5, backend="gurobi-ish")
    with pytest.raises(InvalidInputError, match="layer names must be unique"):
        allocate_budget([layers[0], layers[0]], 0.5)


def test_layer_weights_shift_the_allocation():
    rng = np.random.default_rng(5)
    e = error_curve(10, rng)
    base = [LayerBudget.conv("a", e, out_channels=10, kernel_size=3, out_hw=(4, 4), in_channels=3),
            LayerBudget.conv("b", e, out_channels=10, kernel_size=3, out_hw=(4, 4), in_channels=3)]
    heavy_a = [LayerBudget.conv("a", e, out_channels=10, kernel_size=3, out_hw=(4, 4), in_channels=3, weight=10.0),
               base[1]]
    r0 = allocate_budget(base, 0.5, tolerance=0.1)
    r1 = allocate_budget(heavy_a, 0.5, tolerance=0.1)
    assert r1.widths["a"] >= r0.widths["a"] and r1.widths["a"] > r1.widths["b"]


def test_cpsat_cost_scaling_is_exact_or_says_so():
    from solvers.budget import _integer_scale

    assert _integer_scale([3, 12.0, 0]) == (1, True)
    assert _integer_scale([1.5, 0.25]) == (100, True)
    assert _integer_scale([1 / 3]) == (10 ** 6, False)


def test_cpsat_on_non_integral_costs_reports_no_bound():
    """Costs no power of ten makes integral: CP-SAT solves a rounded model, so nothing it proves
    is reported (the widths are still re-checked in float64 against the real window)."""
    rng = np.random.default_rng(0)
    layers = [LayerBudget("a", 6, error_curve(6, rng), flops_per_channel=1 / 3, in_channels=None),
              LayerBudget("b", 5, error_curve(5, rng), flops_per_channel=np.pi)]
    target = total_cost(layers, [4, 3], "flops") / total_cost(layers, [6, 5], "flops")   # (4, 3) fits
    res = allocate_budget(layers, target, backend="cpsat", time_limit=10)
    assert res.bound is None and res.gap is None and res.status == Status.FEASIBLE
    assert res.info["exact_costs"] is False
    assert target * 0.995 - 1e-9 <= res.ratio <= target + 1e-9
    ref = allocate_budget(layers, target, backend="highs")
    assert ref.status == Status.OPTIMAL and ref.bound is not None
    assert ref.objective == pytest.approx(brute_force_allocation(layers, target)[1])
