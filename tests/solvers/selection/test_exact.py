"""Exact group subset selection: brute-force optima, valid bounds, honest statuses, every backend."""
from __future__ import annotations

import importlib.util
import itertools
import time

import numpy as np
import pytest

from solvers import (InfeasibleBudgetError, InvalidInputError, SelectionProblem, SolverNotAvailableError, Status,
                     select_channels)
from solvers.selection.greedy import whiten
from solvers.selection.exact import Relaxation, choose_shift, select_exact
from tests.solvers.selection.bank import BANK, BANK_IDS, BUDGET_BANK, BUDGET_IDS, brute_force, make_problem

BACKENDS = ["bnb", "highs", pytest.param("scip", marks=pytest.mark.skipif(
    importlib.util.find_spec("pyscipopt") is None, reason="pyscipopt not installed"))]
TIGHT = 1e-7  # requested gap in the bank tests (the default is 1e-4)


@pytest.fixture(autouse=True)
def _no_enumeration(monkeypatch):
    """These tests exercise the branch and bound and its bounds: keep small problems off enumeration."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_exact_finds_the_brute_force_optimum(problem, k, backend):
    mask_opt, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, backend=backend, rel_gap=TIGHT, lasso=False)
    assert res.status is Status.OPTIMAL and res.backend == backend and res.method == "exact"
    assert res.k <= k
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    assert res.objective == pytest.approx(problem.error(res.mask), rel=1e-12)
    assert res.bound <= opt + 1e-9
    assert res.gap <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem, budget", BUDGET_BANK, ids=BUDGET_IDS)
def test_exact_with_a_cost_budget(problem, budget, backend):
    _, opt = brute_force(problem, budget=budget)
    res = select_exact(problem, budget=budget, backend=backend, rel_gap=TIGHT, lasso=False)
    assert problem.costs[res.mask].sum() <= budget + 1e-12
    assert res.status is Status.OPTIMAL
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    assert res.bound <= opt + 1e-9 and res.gap <= 1e-6


def test_exact_with_k_and_budget_together():
    p, budget = BUDGET_BANK[1]
    C = p.n_channels
    best = min((p.error(p.mask_from_support(S)), S) for r in range(1, 4)
               for S in itertools.combinations(range(C), r) if p.costs[list(S)].sum() <= budget)
    res = select_channels(p, k=3, budget=budget, method="exact")
    assert res.k <= 3 and p.costs[res.mask].sum() <= budget
    assert res.objective == pytest.approx(best[0], rel=1e-9)
    assert res.bound <= best[0] + 1e-9


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_heuristics_never_beat_the_certified_optimum(problem, k):
    res = select_channels(problem, k=k, method="exact")
    for method in ("greedy", "backward", "lasso"):
        other = select_channels(problem, k=k, method=method)
        assert other.objective >= res.bound - 1e-12
        assert other.objective >= brute_force(problem, k)[1] - 1e-12


def test_select_channels_routes_to_exact_and_reports_honestly():
    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    res = select_channels(p, k=k, method="exact")
    assert res.method == "exact" and res.backend == "bnb" and res.status is Status.OPTIMAL
    assert res.gap <= 1e-4 and res.iterations >= 1
    assert set(res.info) >= {"root_bound", "incumbents", "shift_mean"}


def test_minorant_is_valid_for_every_subset():
    """The core inequality: for any W from the relaxation, err(S)·‖Y‖² >= L − Σ_{g∈S} a_g for every S."""
    p = make_problem(9, 2, 3, 90, seed=21)
    w = whiten(p)
    rel = Relaxation(w, choose_shift(w))
    assert np.all(rel.t > 0)
    M_shift = w.M - np.diag(rel.t[w.col_group])
    assert np.linalg.eigvalsh(M_shift)[0] >= 0                 # Q = M − T ⪰ 0
    rng = np.random.default_rng(0)
    subsets = [list(S) for r in range(0, 10) for S in itertools.combinations(range(9), r)]
    for _ in range(6):
        z = rng.uniform(0, 1, size=9) * (rng.uniform(size=9) < 0.8)
        W, F = rel.solve(z, np.zeros(9, bool))
        L, a = rel.dual(W)
        assert L - a @ z == pytest.approx(F, rel=1e-7, abs=1e-9 * p.target_sq)   # tight at z
        for S in subsets:
            m = np.zeros(9, bool)
            m[S] = True
            assert L - a[m].sum() <= p.error(m) * p.target_sq * (1 + 1e-9) + 1e-9 * p.target_sq


def test_collinear_channels_fall_back_to_monotone_bounds_and_stay_exact():
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(150, 8))
    Z[:, 7] = Z[:, 1] - 0.5 * Z[:, 3]          # channel 7 is a combination of 1 and 3: M singular
    Y = Z @ rng.normal(size=(8, 2)) + 0.05 * rng.normal(size=(150, 2))
    p = SelectionProblem.from_data(Z, Y, np.arange(8))
    assert np.all(choose_shift(whiten(p)) == 0)
    for backend in ("bnb", "highs"):
        res = select_exact(p, k=3, backend=backend, rel_gap=TIGHT)
        assert res.objective == pytest.approx(brute_force(p, 3)[1], rel=1e-9)
        assert res.bound <= res.objective + 1e-12 and res.status is Status.OPTIMAL


def test_dead_channel_is_never_needed():
    rng = np.random.default_rng(8)
    Z = rng.normal(size=(120, 10))
    Z[:, 4:6] = 0.0
    Y = Z @ rng.normal(size=(10, 2))
    p = SelectionProblem.from_data(Z, Y, np.repeat(np.arange(5), 2))
    res = select_exact(p, k=2, rel_gap=TIGHT)
    assert not res.mask[2]
    assert res.objective == pytest.approx(brute_force(p, 2)[1], rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limit_gives_time_limit_status_with_a_valid_incumbent(backend):
    p = make_problem(96, 3, 8, 800, seed=1)      # not certified within 60 s (gap 3.4 % then)
    limit = 1.0
    t0 = time.perf_counter()
    res = select_channels(p, k=48, method="exact", backend=backend, time_limit=limit)
    wall = time.perf_counter() - t0
    assert wall <= limit + 1.0
    assert res.status is Status.TIME_LIMIT
    assert res.k == 48 and res.objective == pytest.approx(p.error(res.mask), rel=1e-12)
    assert res.bound is not None and res.bound <= res.objective
    assert res.gap > 1e-4


def test_parallel_branch_and_bound_finds_the_brute_force_optimum(monkeypatch):
    """Two worker processes bound the nodes; the incumbents they find and their prunings come back to
    the main process: the same certified optimum as brute force, on a cardinality and a budget problem."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)     # (C = 12, k = 2 is 66 sets: the tree, not the enumeration)
    (p, k), (pb, budget) = BANK[BANK_IDS.index("correlated_C12_k2")], BUDGET_BANK[0]   # 15 and 29 nodes
    _, opt = brute_force(p, k)
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False, warm_start=False, workers=2)
    assert res.status is Status.OPTIMAL and res.iterations > 1 and res.info["workers"] == 2
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    assert res.info["incumbents"]["bnb"] >= opt - 1e-12      # the workers' sets are merged (no warm start)
    _, opt_b = brute_force(pb, budget=budget)
    res_b = select_exact(pb, budget=budget, rel_gap=TIGHT, lasso=False, workers=2)
    assert res_b.status is Status.OPTIMAL and pb.costs[res_b.mask].sum() <= budget + 1e-12
    assert res_b.info["workers"] == 2 and res_b.iterations > 1
    assert res_b.objective == pytest.approx(opt_b, rel=1e-9, abs=1e-13) and res_b.bound <= opt_b + 1e-9


def test_parallel_branch_and_bound_keeps_the_time_limit_and_a_valid_bound():
    p = make_problem(96, 3, 8, 800, seed=1)      # not certified within 60 s
    limit = 3.0
    t0 = time.perf_counter()
    res = select_exact(p, k=48, time_limit=limit, workers=2)
    wall = time.perf_counter() - t0
    assert wall <= limit + 1.0
    assert res.status is Status.TIME_LIMIT and res.k == 48
    assert res.bound is not None and 0 < res.bound <= res.objective and res.gap > 1e-4
    single = select_exact(p, k=48, time_limit=limit)
    assert res.bound <= single.objective        # a bound on the optimum: below any set's error


def test_infeasible_budget_and_bad_arguments():
    p, _ = BUDGET_BANK[0]
    with pytest.raises(InfeasibleBudgetError, match="budget must allow at least one channel"):
        select_channels(p, budget=0.5, method="exact")
    with pytest.raises(SolverNotAvailableError, match="backend must be one of"):
        select_channels(p, k=2, method="exact", backend="gurobi")
    with pytest.raises(InvalidInputError, match="rel_gap must be in"):
        select_exact(p, k=2, rel_gap=2.0)
    with pytest.raises(InvalidInputError, match="time_limit must be > 0"):
        select_exact(p, k=2, time_limit=0)
    with pytest.raises(InvalidInputError, match="workers must be an integer >= 1"):
        select_exact(p, k=2, workers=0)


def test_scip_missing_raises_solver_not_available(monkeypatch):
    import solvers.selection.exact as subset

    real = importlib.util.find_spec
    monkeypatch.setattr(subset.importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "pyscipopt" else real(name, *a, **kw))
    p, k = BANK[0]
    with pytest.raises(SolverNotAvailableError, match="pyscipopt"):
        select_exact(p, k=k, backend="scip")


def test_keeping_everything_is_trivially_optimal():
    p, _ = BANK[0]
    res = select_exact(p, k=p.n_channels)
    assert res.mask.all() and res.status is Status.OPTIMAL and res.gap == 0.0


def test_node_lmo_upper_bounds_every_feasible_binary_choice():
    """The node bound subtracts max Σ a_g z_g over the node: it must never under-estimate that max."""
    from solvers.selection.exact import _lmo

    rng = np.random.default_rng(3)
    for trial in range(60):
        C = 7
        a = rng.exponential(size=C) * (rng.uniform(size=C) < 0.8)
        costs = rng.choice([0.0, 1.0, 2.0, 3.5], size=C)
        free = rng.uniform(size=C) < 0.85
        r = int(rng.integers(0, 5)) if trial % 3 != 2 else None
        cap = float(rng.uniform(0, 6)) if trial % 3 != 0 else None
        if r is None and cap is None:
            r = 3
        z, upper = _lmo(a, free, r, cap, costs)
        assert np.all(z[~free] == 0) and np.all((z >= 0) & (z <= 1 + 1e-12))
        assert r is None or z.sum() <= r + 1e-9
        assert cap is None or costs @ z <= cap + 1e-9
        best = 0.0
        for bits in itertools.product([0, 1], repeat=C):
            x = np.array(bits, bool)
            if (x & ~free).any() or (r is not None and x.sum() > r) or (cap is not None and costs[x].sum() > cap):
                continue
            best = max(best, a[x].sum())
        assert upper >= best - 1e-12


def test_block_shift_minorant_is_valid_for_every_subset():
    """Block-diagonal shifts D_g (optimal perspective, first order): M − D ⪰ 0 and L − Σ_S a_g <= err(S)·‖Y‖²."""
    from solvers.selection.exact import _Search, _block_shift
    from solvers.selection.perspective import eig_blocks, rotate

    p = make_problem(9, 3, 3, 120, seed=22, correlation=0.9)
    w = whiten(p)
    t = choose_shift(w)
    S = _Search(p, 4, None, Relaxation(w, t), None, 1e-4)
    S.offer(brute_force(p, 4)[0], "opt")
    D, trace = _block_shift(S, w, t, None, 25)
    assert D is not None and max(trace) > trace[0]          # the ascent found stronger shifts
    Dm = np.zeros_like(w.M)
    for g in range(9):
        Dm[w.cols(g), w.cols(g)] = D[g]
        assert np.linalg.eigvalsh(D[g])[0] > 0
    assert np.linalg.eigvalsh(w.M - Dm)[0] >= 0
    U, d = eig_blocks(D)
    wr = rotate(w, U)
    rel = Relaxation(wr, d)
    subsets = [list(c) for r in range(0, 10) for c in itertools.combinations(range(9), r)]
    for S_ in subsets[::7]:                                      # rotation leaves every refit error alone
        m = np.zeros(9, bool)
        m[S_] = True
        assert wr.explained(m) == pytest.approx(w.explained(m), rel=1e-9, abs=1e-12 * p.target_sq)
    rng = np.random.default_rng(1)
    for _ in range(5):
        z = rng.uniform(0, 1, size=9)
        W, F = rel.solve(z, np.zeros(9, bool))
        L, a = rel.dual(W)
        assert L - a @ z == pytest.approx(F, rel=1e-7, abs=1e-9 * p.target_sq)
        for S_ in subsets:
            m = np.zeros(9, bool)
            m[S_] = True
            assert L - a[m].sum() <= p.error(m) * p.target_sq * (1 + 1e-9) + 1e-9 * p.target_sq


@pytest.mark.parametrize("shift", ["block", "ascent"])
@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_block_root_bound_is_valid_and_no_weaker_than_the_scalar_one(problem, k, shift):
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, rel_gap=TIGHT, lasso=False, shift=shift)
    assert res.info["root_bound"] <= opt + 1e-9
    assert res.info["root_bound"] >= res.info["root_bound_scalar"] - 1e-12
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    scalar = select_exact(problem, k=k, rel_gap=TIGHT, lasso=False, shift="scalar")
    assert scalar.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and "shift_steps" not in scalar.info


def test_large_problems_take_the_uniform_shift_and_stay_exact(monkeypatch):
    import solvers.selection.exact as ex

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    monkeypatch.setattr(ex, "NEWTON_MAX_COLUMNS", 4)          # as if r were in the thousands
    w = whiten(p)
    t = choose_shift(w)
    assert np.ptp(t) == 0 and t[0] > 0                           # one shift: 0.9·λ_min
    assert np.linalg.eigvalsh(w.M - np.diag(t[w.col_group]))[0] >= 0
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False)
    assert res.objective == pytest.approx(brute_force(p, k)[1], rel=1e-9) and res.status is Status.OPTIMAL


def test_bad_shift_name_is_rejected():
    p, k = BANK[0]
    with pytest.raises(InvalidInputError, match="shift must be one of"):
        select_exact(p, k=k, shift="diagonal")


def test_no_time_for_a_factorization_gives_the_incumbent_and_a_zero_bound(monkeypatch):
    import solvers.selection.exact as ex

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    _root_never_fits(monkeypatch, ex, measured=1e-3)          # not even the ascent's two factorizations fit
    res = select_exact(p, k=k, time_limit=5.0, lasso=False)
    assert res.status is Status.TIME_LIMIT and res.bound == 0.0 and res.gap == pytest.approx(1.0)
    assert res.k == k and res.objective == pytest.approx(p.error(res.mask), rel=1e-12)
    assert res.info["skipped_root"] and res.solve_time < 5.0


def _root_never_fits(monkeypatch, ex, measured: float | None = None):
    """As if r were far too large for any root relaxation in the limit (``FLOP_RATE`` tiny); ``measured`` the
    machine's measured speed the ascent's fallback sees (None: the real one)."""
    monkeypatch.setattr(ex, "FLOP_RATE", 1e-3)
    if measured is not None:
        monkeypatch.setattr(ex, "_measured_flop_rate", lambda n: measured)


@pytest.mark.parametrize("shift_kind", ["uniform", "newton"])
def test_the_minorant_of_any_weights_is_valid_for_every_subset(shift_kind, monkeypatch):
    """``Relaxation.minorant`` at arbitrary weights (not a relaxed solve: what the ascent visits) bounds the
    error of every channel set from below once every channel is shifted."""
    import solvers.selection.exact as ex

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    if shift_kind == "uniform":
        monkeypatch.setattr(ex, "NEWTON_MAX_COLUMNS", 4)
    w = whiten(p)
    rel = Relaxation(w, choose_shift(w))
    assert rel.shifted.all()
    rng = np.random.default_rng(0)
    C = p.n_channels
    errs = {S: p.error(np.isin(np.arange(C), S)) * p.target_sq
            for r in range(C + 1) for S in itertools.combinations(range(C), r)}
    for scale in (0.0, 0.3, 1.0, 3.0):
        W = scale * rng.normal(size=w.B.shape)
        L, a, _ = rel.minorant(W, rel.shifted_product(W))
        for S, e in errs.items():
            assert L - a[list(S)].sum() <= e + 1e-9 * p.target_sq


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_without_time_for_a_root_the_ascent_gives_a_valid_bound(problem, k, monkeypatch):
    """Past the size where the root relaxation fits, the bound comes from the ascent on the minorant's weights,
    started at the incumbent's cut: never above the brute-force optimum (it may stay 0: the bank's collinear
    problems have no shift, and the greedy trap's incumbent is 1,000× the optimum)."""
    import solvers.selection.exact as ex

    _root_never_fits(monkeypatch, ex)
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, time_limit=20.0, lasso=False)
    assert res.info["skipped_root"]
    assert res.bound <= opt + 1e-9 and 0.0 <= res.bound <= res.objective
    assert res.status in (Status.TIME_LIMIT, Status.OPTIMAL)
    if res.status is Status.OPTIMAL:
        assert res.objective == pytest.approx(opt, rel=1e-4)
    if "cut_steps" in res.info:
        assert res.info["shift_used"] == "scalar" and res.iterations == res.info["cut_steps"]


def test_without_time_for_a_root_a_well_conditioned_layer_still_gets_most_of_its_bound(monkeypatch):
    import solvers.selection.exact as ex

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    _, opt = brute_force(p, k)
    _root_never_fits(monkeypatch, ex)
    res = select_exact(p, k=k, time_limit=20.0, lasso=False)
    assert res.info["cut_steps"] > 0
    assert 0.5 * opt < res.bound <= opt + 1e-9


@pytest.mark.parametrize("problem, budget", BUDGET_BANK, ids=BUDGET_IDS)
def test_the_ascent_bounds_budgeted_problems_too(problem, budget, monkeypatch):
    import solvers.selection.exact as ex

    _root_never_fits(monkeypatch, ex)
    _, opt = brute_force(problem, budget=budget)
    res = select_exact(problem, budget=budget, time_limit=20.0, lasso=False)
    assert res.info["skipped_root"] and 0.0 <= res.bound <= opt + 1e-9


def test_the_ascent_raises_the_incumbents_cut():
    """On a layer whose greedy set is not optimal, the steps raise the bound above the incumbent's own cut."""
    import solvers.selection.exact as ex
    from solvers.selection.greedy import forward_mask

    p = make_problem(C=10, cols_per_channel=4, m=6, n=400, seed=3)
    k = 4
    w = whiten(p)
    S = ex._Search(p, k, None, ex.Relaxation(w, choose_shift(w)), None, 1e-4)
    S.offer(forward_mask(p, k, None, w=w), "greedy")
    W, _ = S.rel.solve(S.best_mask.astype(float), ~S.best_mask)
    L, a, _ = S.rel.minorant(W, S.rel.shifted_product(W))
    cut, _ = S.bound(L, a, np.zeros(10, bool), np.ones(10, bool))
    lb, steps, L1, a1 = ex._cut_ascent(S, W, None, max_steps=50)
    assert S.bound(L1, a1, np.zeros(10, bool), np.ones(10, bool))[0] == pytest.approx(lb, rel=1e-12)
    assert steps > 0 and lb > cut
    assert lb <= brute_force(p, k)[1] * p.target_sq + 1e-9 * p.target_sq


@pytest.mark.parametrize("problem, k", [BANK[BANK_IDS.index(n)] for n in ("dense_C12_k6", "conv3x3_C8_k4")],
                         ids=["dense_C12_k6", "conv3x3_C8_k4"])
def test_a_large_layers_scalar_root_is_raised_by_the_ascent_and_stays_exact(problem, k, monkeypatch):
    """Past BLOCK_LARGE_COLUMNS with the scalar root in use, the minorant ascent runs after the root; its
    minorant replaces the root's only when it bounds more, and the search still ends at the brute-force optimum."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "BLOCK_LARGE_COLUMNS", 4)
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, rel_gap=TIGHT, lasso=False, shift="scalar")
    assert "cut_steps" in res.info and 0.0 <= res.info["root_bound_cut"] <= opt + 1e-9
    assert res.info["root_bound"] >= max(res.info["root_bound_cut"], res.info["root_bound_scalar"]) - 1e-12
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9


def test_block_shifts_out_of_reach_are_skipped_for_the_ascent(monkeypatch):
    """A large layer whose block shifts could not run their first iterations in their share keeps the scalar root
    and the minorant ascent (the block attempt at C = 1,024 3×3 outlasted its share by a minute, for nothing)."""
    import solvers.selection.exact as ex

    p, k = BANK[BANK_IDS.index("conv3x3_C8_k4")]
    monkeypatch.setattr(ex, "BLOCK_LARGE_COLUMNS", 4)
    monkeypatch.setattr(ex, "BLOCK_MIN_FACTORIZATIONS", 1e15)
    _, opt = brute_force(p, k)
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False, time_limit=60.0)
    assert res.info["block_skipped"] and res.info["shift_used"] == "scalar" and "cut_steps" in res.info
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    monkeypatch.setattr(ex, "BLOCK_MIN_FACTORIZATIONS", 10)
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False, time_limit=60.0)
    assert "block_skipped" not in res.info


@pytest.mark.parametrize("problem, k", [BANK[BANK_IDS.index(n)] for n in ("dense_C12_k6", "planted_C10_k4")],
                         ids=["dense_C12_k6", "planted_C10_k4"])
def test_large_one_column_layers_take_newton_shifts_and_the_ascent(problem, k, monkeypatch):
    """One-column layers past ONE_COLUMN_ASCENT_MIN skip the block shifts (their diagonal is what the Newton search
    climbs too) for a longer Newton search and the ascent after the root; the search still proves the optimum.
    Layers with several columns per channel keep the block shifts."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ONE_COLUMN_ASCENT_MIN", 1)
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, rel_gap=TIGHT, lasso=False, time_limit=60.0)
    assert res.info["block_skipped"] and res.info["shift_used"] == "scalar"
    # (the ascent runs unless the root already proves the incumbent, as on the planted layer)
    assert "cut_steps" in res.info or res.info["root_bound"] >= res.objective * (1 - TIGHT)
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    p3, k3 = BANK[BANK_IDS.index("conv3x3_C8_k4")]
    res3 = select_exact(p3, k=k3, rel_gap=TIGHT, lasso=False, time_limit=60.0)
    assert "block_skipped" not in res3.info



def test_when_the_ascent_does_not_fit_after_all_the_warm_start_goes_on(monkeypatch):
    """The warm start stopped early for the ascent; when the ascent's own check then fails (a slower machine than
    measured), the rest of the limit improves the incumbent instead: never worse than greedy, bound 0, flagged."""
    import solvers.selection.exact as ex
    from solvers.selection.greedy import forward_mask

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    _root_never_fits(monkeypatch, ex)
    monkeypatch.setattr(ex, "CUT_FIRST_FACTORIZATIONS", 1e30)  # the pre-check (CUT_FACTORIZATIONS) passes
    res = select_exact(p, k=k, time_limit=5.0, lasso=False)
    assert res.info["skipped_root"] and res.info["warm_resumed"] and res.bound == 0.0
    assert res.objective <= p.error(forward_mask(p, k, None)) + 1e-12 and res.k == k


def test_the_shifts_check_is_not_started_when_the_first_factorization_says_it_would_end_too_late():
    """``_with_margin`` given one factorization's measured time starts no Cholesky that would end past its
    deadline (zeros: no shift, still a valid bound); without a deadline it certifies the shift."""
    import solvers.selection.exact as ex

    p, _ = BANK[BANK_IDS.index("dense_C12_k6")]
    w = whiten(p)
    t = np.full(p.n_channels, 0.5 * ex._lambda_min(w.M))
    late = ex._with_margin(w.M, w.col_group, t, deadline=time.perf_counter() + 1.0, factor_seconds=5.0)
    assert not late.any()
    ok = ex._with_margin(w.M, w.col_group, t, deadline=time.perf_counter() + 5.0, factor_seconds=0.01)
    assert np.array_equal(ok, t)
    timing = {}
    ex._lambda_min(np.eye(3500), timing)                    # (the inverse iteration's branch times its factor)
    assert timing["factor_s"] > 0


@pytest.mark.parametrize("lazy", [False, True])
def test_panel_factorizations_certify_the_same_shifts_as_lapack(lazy, monkeypatch):
    """Past ``panel_threshold`` the shift's check and λ_min's estimate factor in panels (half the memory),
    reading a lazily whitened ``M`` panel by panel: the same certified shifts and the same estimate as one
    LAPACK factorization of the whole matrix; a shift past λ_min is shrunk to the same one."""
    import solvers.selection.exact as ex
    import solvers.selection.greedy as gr
    import solvers.selection.panel_cholesky as pc

    rng = np.random.default_rng(4)
    C, n = 420, 1400
    Z = rng.normal(size=(n, C)) @ (np.eye(C) + 0.05 * rng.normal(size=(C, C)))
    p = SelectionProblem.from_data(Z, Z[:, :8] @ rng.normal(size=(8, 3)), rng.permutation(C))
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0 if lazy else 10**9)
    w = whiten(p, lazy=True)
    lam = float(np.linalg.eigvalsh(np.asarray(w.M))[0])
    t = np.full(C, 0.9 * lam)
    monkeypatch.setattr(pc, "PANEL_MIN_COLUMNS", 10**9)
    monkeypatch.setattr(pc, "PANEL_MIN_DENSE_COLUMNS", 10**9)
    lapack_ok, lapack_bad = ex._with_margin(w.M, w.col_group, t), ex._with_margin(w.M, w.col_group, 1.2 * t)
    monkeypatch.setattr(pc, "PANEL_MIN_COLUMNS", 100)
    monkeypatch.setattr(pc, "PANEL_MIN_DENSE_COLUMNS", 100)
    assert np.array_equal(ex._with_margin(w.M, w.col_group, t), lapack_ok) and np.array_equal(lapack_ok, t)
    assert np.array_equal(ex._with_margin(w.M, w.col_group, 1.2 * t), lapack_bad) and np.all(lapack_bad < 1.2 * t)
    cf = ex._factor_shifted(w.M, 0.5 * lam)
    assert isinstance(cf, pc.PanelCholesky)
    v = rng.normal(size=C)
    np.testing.assert_allclose(ex._solve_factored(cf, v), np.linalg.solve(np.asarray(w.M) - 0.5 * lam * np.eye(C), v),
                               rtol=1e-8)


def test_relaxed_solves_in_panels_equal_lapacks(monkeypatch):
    """Relaxed solves past the panel threshold (``PANEL_MIN_DENSE_COLUMNS`` for an array, ``PANEL_MIN_COLUMNS`` for a
    lazy Gram) factor the gathered ``M_TT + ridge`` in panels (half of it): the same weights and value as LAPACK."""
    import solvers.selection.exact as ex
    import solvers.selection.panel_cholesky as pc

    p = make_problem(C=30, cols_per_channel=3, m=5, n=400, seed=8)
    w = whiten(p)
    rel = ex.Relaxation(w, choose_shift(w))
    z = np.random.default_rng(1).uniform(0.1, 1.0, 30)
    out = np.zeros(30, bool)
    out[[2, 7]] = True
    monkeypatch.setattr(pc, "PANEL_MIN_DENSE_COLUMNS", 10**9)
    W0, F0 = rel.solve(z, out)
    monkeypatch.setattr(pc, "PANEL_MIN_DENSE_COLUMNS", 16)
    W1, F1 = rel.solve(z, out)
    np.testing.assert_allclose(W1, W0, rtol=1e-8, atol=1e-12)
    assert F1 == pytest.approx(F0, rel=1e-10) and np.all(W1[np.isin(w.col_group, [2, 7])] == 0)


def test_single_precision_newton_shifts_are_certified(monkeypatch):
    """One column per channel past ``SINGLE_MIN_COLUMNS``: the Newton system is factored in float32 in place of the
    inverse (no float64 copy); every point it reaches is still certified in float64, and the shifts it ends at are
    as large as the float64 search's to within a few per cent."""
    import solvers.selection.exact as ex

    rng = np.random.default_rng(6)
    C, n = 150, 600
    Z = rng.normal(size=(n, C)) @ (np.eye(C) + 0.3 * rng.normal(size=(C, C)) / np.sqrt(C))
    p = SelectionProblem.from_data(Z, Z[:, :12] @ rng.normal(size=(12, 3)), np.arange(C))
    w = whiten(p)
    monkeypatch.setattr(ex, "SINGLE_MIN_COLUMNS", 10**9)
    t64 = choose_shift(w)
    monkeypatch.setattr(ex, "SINGLE_MIN_COLUMNS", 100)
    t32 = choose_shift(w)
    assert np.all(t32 > 0) and t32.sum() == pytest.approx(t64.sum(), rel=0.05)
    assert np.linalg.eigvalsh(np.asarray(w.M) - np.diag(t32[w.col_group]))[0] > 0.0


def _spy_warm_start(monkeypatch, p, *, lasso_mask=None, backward=True):
    """Run exact's warm start heuristics with swaps that record their start and improve nothing (and a LASSO that
    returns ``lasso_mask``); returns the calls in order and the search."""
    import types

    import solvers.selection.exact as ex
    import solvers.selection.lasso as lasso_mod

    calls = []

    def no_swaps(problem, mask, **kw):
        calls.append(("swap", np.asarray(mask, bool).copy()))
        return np.asarray(mask, bool)

    def fake_lasso(problem, k=None, time_limit=None):
        calls.append(("lasso", None))
        return types.SimpleNamespace(mask=np.asarray(lasso_mask, bool).copy())

    monkeypatch.setattr(ex, "improve_by_swaps", no_swaps)
    monkeypatch.setattr(lasso_mod, "select_lasso", fake_lasso)
    if not backward:
        monkeypatch.setattr(ex, "backward_start_fits", lambda w: False)
    w = whiten(p)
    S = ex._Search(p, p.n_channels // 3, None, Relaxation(w, np.zeros(p.n_channels)), None, TIGHT)
    ex._warm_start_heuristics(S, w, use_lasso=lasso_mask is not None)
    return calls, S


def test_swaps_run_before_lasso_and_again_from_lassos_set(monkeypatch):
    """The warm start swaps from greedy's set before LASSO runs (under a short limit LASSO took the whole share and
    the swaps none), then swaps from LASSO's set too: swap search's local optimum depends on its start."""
    p, k = BANK[BANK_IDS.index("greedy_trap_C6_k2")]       # greedy's set is not optimal here
    assert k == p.n_channels // 3
    opt_mask, opt = brute_force(p, k)
    calls, S = _spy_warm_start(monkeypatch, p, lasso_mask=opt_mask, backward=False)
    assert [c[0] for c in calls] == ["swap", "lasso", "swap"]
    assert p.error(calls[0][1]) > opt * (1 + 1e-9)            # the first swaps started from greedy's set …
    assert np.array_equal(calls[2][1], opt_mask)              # … the last from LASSO's
    assert S.best_source == "lasso" and S.best_err / S.c == pytest.approx(opt, rel=1e-9)


def test_swaps_start_from_backward_and_from_greedy_the_better_first(monkeypatch):
    """Where greedy and backward end in different sets, swaps run from both, the better start first."""
    from solvers.selection.greedy import backward_mask, forward_mask

    p, k = BANK[BANK_IDS.index("greedy_trap_C6_k2")]
    g, b = forward_mask(p, k, None), backward_mask(p, k, None)
    assert not np.array_equal(g, b) and p.error(b) < p.error(g)
    calls, _ = _spy_warm_start(monkeypatch, p)
    assert [c[0] for c in calls] == ["swap", "swap"]
    assert np.array_equal(calls[0][1], b) and np.array_equal(calls[1][1], g)
