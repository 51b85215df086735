"""Root restarts of the exact selection: the reduced problem is the original one restricted to the fixings,
and a restarted search certifies the same optimum as brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers import Status
from solvers.selection.exact import select_exact
from solvers.selection.greedy import whiten
from solvers.selection.restart import reduce_problem
from tests.solvers.selection.bank import BANK, BANK_IDS, BUDGET_BANK, BUDGET_IDS, brute_force, make_problem

TIGHT = 1e-7


@pytest.fixture(autouse=True)
def _no_enumeration(monkeypatch):
    """Keep the small problems on the branch and bound, off enumeration, and let them restart (by default only
    problems of ``RESTART_MIN_COLUMNS`` whitened columns do)."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)
    monkeypatch.setattr(ex, "RESTART_MIN_COLUMNS", 0)


def test_reduced_problem_gives_every_set_its_original_error():
    """err(F ∪ S)·‖Y‖² of the original problem equals the reduced problem's energy of S, for every S."""
    p = make_problem(9, 3, 4, 200, seed=3)
    w = whiten(p)
    fin = np.zeros(9, bool)
    fout = np.zeros(9, bool)
    fin[[1, 5]] = True
    fout[7] = True
    red = reduce_problem(w, p.costs, fin, fout)
    assert red is not None and red.free.tolist() == [0, 2, 3, 4, 6, 8]
    assert red.problem.costs.tolist() == p.costs[red.free].tolist()
    for r in range(0, 7):
        for S in itertools.combinations(range(6), r):
            mask = np.zeros(6, bool)
            mask[list(S)] = True
            full = red.lift(mask)
            assert full[[1, 5]].all() and not full[7] and full.sum() == 2 + r
            e_red = red.problem.error(mask) * red.problem.target_sq if r else red.problem.target_sq
            assert e_red == pytest.approx(p.error(full) * p.target_sq, rel=1e-9, abs=1e-12 * p.target_sq)


def test_nothing_free_or_everything_explained_gives_no_reduced_problem():
    p = make_problem(4, 2, 3, 100, seed=1)
    w = whiten(p)
    every = np.ones(4, bool)
    assert reduce_problem(w, p.costs, every, ~every) is None
    assert reduce_problem(w, p.costs, ~every, every) is None


@pytest.mark.parametrize("case", ["dense_C12_k6"])
def test_a_restarted_search_certifies_the_brute_force_optimum(case, monkeypatch):
    p, k = BANK[BANK_IDS.index(case)]
    _, opt = brute_force(p, k)
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False)
    (first, *_) = res.info["restarts"]
    assert first["fixed_in"] + first["fixed_out"] >= 1 and first["channels"] < p.n_channels
    assert first["root_bound"] <= opt + 1e-9
    assert res.status is Status.OPTIMAL and res.k <= k
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-9
    plain = select_exact(p, k=k, rel_gap=TIGHT, lasso=False, restart=False)
    assert "restarts" not in plain.info and plain.objective == pytest.approx(res.objective, rel=1e-12)
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "RESTART_MIN_COLUMNS", 3000)   # the default: under RESTART_INHERIT_MIN_COLUMNS, no restart
    assert "restarts" not in select_exact(p, k=k, rel_gap=TIGHT, lasso=False).info


def test_restarts_under_a_budget_keep_it_nested_or_not():
    """Every restart under a budget (a nested one too: the restarted problem's root may fix enough to restart
    again) keeps the budget, reports its root bound in the original problem's units and certifies brute force's
    optimum. Whether a given problem restarts, and how deep, turns on BLAS round-off near the fixing threshold
    (costs_C10_b12: twice with two OpenBLAS threads, once with one, on an AMD EPYC), so the test takes every
    restart the budget bank gets and asks for at least one."""
    n = 0
    for (p, budget) in BUDGET_BANK:
        _, opt = brute_force(p, budget=budget)
        res = select_exact(p, budget=budget, rel_gap=TIGHT, lasso=False)
        restarts = res.info.get("restarts", [])
        n += len(restarts)
        assert all(r["k"] is None for r in restarts)
        assert all(r["root_bound"] <= opt + 1e-9 for r in restarts)
        assert p.costs[res.mask].sum() <= budget + 1e-12
        assert res.status is Status.OPTIMAL and res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
        assert res.bound <= opt + 1e-9
    assert n >= 1


def test_a_restart_keeps_the_time_limit_and_a_valid_bound(monkeypatch):
    import time

    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "RESTART_MIN_SHARE", 0.0)    # (restart on any fixing)
    p = make_problem(80, 4, 8, 1000, seed=1)      # 6 s: one restart, then ~7 % from optimal
    limit = 6.0
    t0 = time.perf_counter()
    res = select_exact(p, k=40, time_limit=limit)
    assert time.perf_counter() - t0 <= limit + 1.0
    assert res.info["restarts"] and res.status is Status.TIME_LIMIT and res.k == 40
    assert 0 < res.bound <= res.objective and res.gap > 1e-4
    plain = select_exact(p, k=40, time_limit=limit, restart=False)
    assert "restarts" not in plain.info
    assert res.bound <= plain.objective and plain.bound <= res.objective


def test_an_initial_set_is_the_first_incumbent_and_a_bad_one_is_refused():
    from solvers import InvalidInputError

    p, k = BANK[BANK_IDS.index("correlated_C12_k2")]
    mask_opt, opt = brute_force(p, k)
    res = select_exact(p, k=k, rel_gap=TIGHT, warm_start=False, initial=mask_opt)
    assert res.info["incumbents"]["initial"] == pytest.approx(opt, rel=1e-9)
    assert res.status is Status.OPTIMAL and res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    too_many = np.ones(p.n_channels, bool)                 # infeasible for k: not an incumbent
    res2 = select_exact(p, k=k, rel_gap=TIGHT, warm_start=False, initial=too_many)
    assert "initial" not in res2.info["incumbents"] and res2.k <= k
    with pytest.raises(InvalidInputError, match="mask must have shape"):
        select_exact(p, k=k, initial=np.ones(3, bool))


@pytest.mark.parametrize("case", ["dense_C12_k6", "correlated_C14_seed1", "correlated_C14_seed3"])
def test_a_cheap_restart_keeps_the_roots_shifts_and_certifies_the_brute_force_optimum(case, monkeypatch):
    """Below RESTART_MIN_COLUMNS the restarted problem inherits the root's shift blocks (valid for the Schur
    complement): its root bound is then the parent's with the fixed-in channels at z = 1, never above the optimum,
    and the search still ends at the brute-force optimum."""
    import solvers.selection.exact as ex

    if case in BANK_IDS:
        p, k = BANK[BANK_IDS.index(case)]
    else:     # (these restart twice or three times: the restarted problems' roots fix more)
        p, k = make_problem(14, 3, 4, 300, seed=int(case[-1]), correlation=0.8), 7
    _, opt = brute_force(p, k)
    monkeypatch.setattr(ex, "RESTART_MIN_COLUMNS", 10**6)
    monkeypatch.setattr(ex, "RESTART_INHERIT_MIN_COLUMNS", 0)
    monkeypatch.setattr(ex, "RESTART_MIN_SHARE", 0.0)
    res = select_exact(p, k=k, rel_gap=TIGHT, lasso=False)
    restarts = res.info["restarts"]
    assert restarts and all(r["shifts"] == "inherited" for r in restarts)
    assert all(r["root_bound"] <= opt + 1e-9 for r in restarts)
    assert res.status is Status.OPTIMAL and res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    assert res.bound <= opt + 1e-9


def test_an_inherited_shift_is_valid_for_the_schur_complement():
    """The parent's blocks restricted to the free channels keep M' − D_N ⪰ 0 in the restarted whitening (checked
    by the eigenvalues), and a shift that is not valid is refused."""
    import solvers.selection.exact as ex
    import scipy.linalg

    from solvers.selection.perspective import blocks

    p = make_problem(10, 3, 4, 200, seed=5, correlation=0.8)
    w = whiten(p)
    t = ex.choose_shift(w)
    D = [np.diag(np.full(w.cols(g).stop - w.cols(g).start, t[g])) for g in range(w.n_channels)]
    fin = np.zeros(10, bool)
    fin[[0, 4, 7]] = True
    red = reduce_problem(w, p.costs, fin, np.zeros(10, bool))
    wr, T = whiten(red.problem, transforms=True)
    got = ex._inherited_shift(wr, T, [D[g] for g in red.free])
    assert got is not None
    U, d = got
    A = wr.M - scipy.linalg.block_diag(*blocks(wr, U, d))
    assert np.linalg.eigvalsh(A)[0] >= 0.0
    assert np.min(d) > 0
    too_big = [5.0 * Dg for Dg in D]
    assert ex._inherited_shift(wr, T, [too_big[g] for g in red.free]) is None


def test_a_lazy_one_column_gram_reduces_to_the_same_problem(monkeypatch):
    """Large one-column groups keep M as a view of the statistics (ScaledGram): the reduced problem (Schur
    complement updated in place) is the dense one's, and the cheap restart's identity bases keep it a view."""
    import solvers.selection.greedy as gr
    from solvers import SelectionProblem
    from solvers.selection.perspective import rotate
    from solvers.selection.scaled_gram import ScaledGram

    rng = np.random.default_rng(2)
    C, n = 60, 400
    Z = rng.normal(size=(n, C)) @ (np.eye(C) + 0.1 * rng.normal(size=(C, C)))
    p = SelectionProblem.from_data(Z, Z[:, :10] @ rng.normal(size=(10, 4)) + 0.1 * rng.normal(size=(n, 4)),
                                   rng.permutation(C))
    fin, fout = np.zeros(C, bool), np.zeros(C, bool)
    fin[[2, 9, 30]] = True
    fout[[4, 40]] = True
    dense = reduce_problem(whiten(p), p.costs, fin, fout)
    monkeypatch.setattr(gr, "LAZY_MIN_CHANNELS", 0)
    w = whiten(p, lazy=True)
    assert isinstance(w.M, ScaledGram)
    lazy = reduce_problem(w, p.costs, fin, fout)
    np.testing.assert_allclose(lazy.problem.gram, dense.problem.gram, rtol=0, atol=1e-12)
    assert np.array_equal(lazy.problem.gram, lazy.problem.gram.T)
    np.testing.assert_allclose(lazy.problem.cross, dense.problem.cross, rtol=1e-12, atol=1e-14)
    assert lazy.problem.target_sq == pytest.approx(dense.problem.target_sq, rel=1e-12)
    assert rotate(w, [np.eye(1)] * C) is w


def test_restarts_on_a_lazy_one_column_gram_prove_the_same_optimum(monkeypatch):
    import solvers.selection.greedy as gr

    p, k = BANK[BANK_IDS.index("dense_C12_k6")]
    if not np.all(np.bincount(p.groups) == 1):
        pytest.skip("the bank problem is not one-column")
    _, opt = brute_force(p, k)
    dense = select_exact(p, k=k, time_limit=30.0, lasso=False)
    monkeypatch.setattr(gr, "LAZY_MIN_CHANNELS", 0)
    lazy = select_exact(p, k=k, time_limit=30.0, lasso=False)
    assert lazy.status == dense.status == Status.OPTIMAL
    assert lazy.objective == pytest.approx(opt, rel=1e-6) and np.array_equal(lazy.mask, dense.mask)
    # (both restart; which channels the root fixes may differ: reduced costs at a threshold, round-off apart)
    assert lazy.info["restarts"] and dense.info["restarts"]


def test_the_cholesky_projection_equals_the_checked_solve(monkeypatch):
    """The Schur complement by ``Z = L⁻¹ M_FN`` (one |F|×|N| beside ``M_NN``) equals the checked solve's
    (``M_FF⁻¹ [M_FN, B_F]``, kept as the fallback for a near-singular ``M_FF``)."""
    import solvers.selection.restart as rs

    p = make_problem(40, 2, 5, 500, seed=4, correlation=0.6)
    w = whiten(p)
    fin, fout = np.zeros(40, bool), np.zeros(40, bool)
    fin[[0, 6, 13, 27, 31]] = True
    fout[[2, 39]] = True
    chol = reduce_problem(w, p.costs, fin, fout)
    monkeypatch.setattr(rs, "_project_out_cholesky", lambda *a: None)
    solve = reduce_problem(w, p.costs, fin, fout)
    np.testing.assert_allclose(chol.problem.gram, solve.problem.gram, rtol=0, atol=1e-10)
    assert np.array_equal(chol.problem.gram, chol.problem.gram.T)
    np.testing.assert_allclose(chol.problem.cross, solve.problem.cross, rtol=1e-9, atol=1e-12)
    assert chol.problem.target_sq == pytest.approx(solve.problem.target_sq, rel=1e-10)


def test_a_singular_fixed_in_gram_takes_the_checked_solve():
    """Two identical channels fixed in: ``M_FF`` is singular, the Cholesky projection declines, and the checked
    solve still gives every set its original error."""
    import solvers.selection.restart as rs
    from solvers import SelectionProblem

    rng = np.random.default_rng(3)
    Z = rng.normal(size=(200, 8))
    Z[:, 1] = Z[:, 0]
    p = SelectionProblem.from_data(Z, Z @ rng.normal(size=(8, 2)) + 0.1 * rng.normal(size=(200, 2)), np.arange(8))
    w = whiten(p)
    fin, fout = np.zeros(8, bool), np.zeros(8, bool)
    fin[[0, 1]] = True
    F, N = fin[w.col_group], ~fin[w.col_group]
    M_NN = np.asarray(w.M)[np.ix_(N, N)]
    assert rs._project_out_cholesky(w, F, N, M_NN, w.B[N]) is None
    red = reduce_problem(w, p.costs, fin, fout)
    for extra in ([], [3], [2, 5, 7]):
        S = fin.copy()
        S[extra] = True
        sub = np.isin(red.free, extra)
        assert red.problem.target_sq * red.problem.error(sub) == pytest.approx(p.target_sq * p.error(S), rel=1e-8,
                                                                               abs=1e-9 * p.target_sq)
