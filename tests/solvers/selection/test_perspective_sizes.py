"""Interior-point shift sizes (solvers.selection.perspective.saddle_sizes) and shift="block" in exact: every
bound stays valid (checked against every subset / brute force), and the sizes beat the scalar shifts."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

import solvers.selection.exact as ex
from solvers.selection.greedy import whiten
from solvers.selection.perspective import inverse_basis, rotate, saddle_sizes
from tests.solvers.selection.bank import BUDGET_BANK, brute_force, make_problem
from tests.solvers.selection.test_exact_line_search import _conv_layer


def _sizes(p, k=None, budget=None, **kw):
    w = whiten(p)
    t = ex.choose_shift(w)
    S = ex._Search(p, k, budget, ex.Relaxation(w, t), None, 1e-4)
    nothing = np.zeros(p.n_channels, bool)
    wr = rotate(w, inverse_basis(w))
    d, val, z, info = saddle_sizes(wr, 0.9 * t[w.col_group], lambda L, a: S.bound(L, a, nothing, ~nothing)[0],
                                   k=k, budget=budget, costs=p.costs, **kw)
    return w, t, wr, d, val, z, info


def _assert_valid(p, wr, d):
    """M − diag d ⪰ 0, d > 0, and the relaxation's minorants under-estimate every subset's error."""
    C = p.n_channels
    assert np.all(d > 0)
    assert np.linalg.eigvalsh(wr.M - np.diag(d))[0] >= -1e-12
    rel = ex.Relaxation(wr, d)
    subsets = [list(c) for r in range(C + 1) for c in itertools.combinations(range(C), r)]
    errs = []
    for S_ in subsets:
        m = np.zeros(C, bool)
        m[S_] = True
        errs.append((m, p.error(m) * p.target_sq))
    rng = np.random.default_rng(0)
    for _ in range(3):
        W, _ = rel.solve(rng.uniform(0, 1, size=C), np.zeros(C, bool))
        L, a = rel.dual(W)
        for m, e in errs:
            assert L - a[m].sum() <= e * (1 + 1e-9) + 1e-9 * p.target_sq


@pytest.mark.parametrize("single", [False, True])
def test_sizes_are_feasible_their_bound_valid_and_above_the_scalar_root(single):
    p = make_problem(8, 3, 3, 150, seed=5, correlation=0.85)
    k = 4
    opt = brute_force(p, k)[1]
    w, t, wr, d, val, z, info = _sizes(p, k=k, single=single)
    _assert_valid(p, wr, d)
    assert val / p.target_sq <= opt * (1 + 1e-9)
    S = ex._Search(p, k, None, ex.Relaxation(w, t), None, 1e-4)
    nothing = np.zeros(8, bool)
    scalar, *_ = ex._relax(S, nothing, nothing, np.full(8, 0.5), 200, converge=True)
    assert val > scalar                                   # the sizes improve on the trace-maximal shift
    # the relaxation built from the sizes proves at least as much as their own minorant did
    S.rel = ex.Relaxation(wr, d)
    lb, *_ = ex._relax(S, nothing, nothing, z, 200, converge=True)
    assert val * (1 - 1e-6) <= max(lb, val) / 1.0 and lb / p.target_sq <= opt * (1 + 1e-9)


def test_sizes_on_an_ill_conditioned_conv_layer_close_most_of_the_root_gap():
    p = _conv_layer(12, 8, 238, 0)                        # n/d = 2.2: scalar root 0.70 of the optimum
    opt = brute_force(p, 6)[1]
    *_, wr, d, val, z, info = _sizes(p, k=6)
    assert 0.9 * opt <= val / p.target_sq <= opt * (1 + 1e-9)     # measured 0.944 of the optimum
    assert np.linalg.eigvalsh(wr.M - np.diag(d))[0] >= -1e-12


@pytest.mark.parametrize("single", [False, True])
def test_sizes_under_a_cost_budget_stay_valid(single):
    p, budget = BUDGET_BANK[0]
    opt = brute_force(p, budget=budget)[1]
    w, t, wr, d, val, z, info = _sizes(p, budget=budget, single=single)
    assert info["iterations"] > 0 and val > -np.inf
    _assert_valid(p, wr, d)
    assert val / p.target_sq <= opt * (1 + 1e-9)
    assert float(p.costs @ z) <= budget                    # the relaxed point stays inside the budget


def test_sizes_past_their_deadline_return_the_start():
    p = make_problem(6, 2, 3, 80, seed=1)
    w, t, wr, d, val, z, info = _sizes(p, k=3, deadline=time.perf_counter() - 1.0)
    assert val == -np.inf and info["iterations"] == 0
    assert np.allclose(d, 0.9 * t[w.col_group])


@pytest.mark.parametrize("backend", ["bnb", "highs"])
def test_block_shifts_prove_the_optimum_with_a_root_bound_at_least_the_ascents(backend, monkeypatch):
    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)          # (C = 12, k = 6 would be enumerated)
    p = _conv_layer(12, 8, 238, 0)
    opt = brute_force(p, 6)[1]
    res = ex.select_exact(p, k=6, backend=backend, lasso=False, rel_gap=1e-7)
    assert res.objective == pytest.approx(opt, rel=1e-9) and res.bound <= opt + 1e-12
    assert res.info["shift_used"] == "block" and res.info["sizes_iterations"] > 0
    assert res.info["root_bound"] <= opt + 1e-12
    if backend == "bnb":
        ascent = ex.select_exact(p, k=6, lasso=False, rel_gap=1e-7, shift="ascent")
        assert res.info["root_bound"] >= ascent.info["root_bound"] - 1e-12


def test_sizes_that_cannot_converge_in_time_give_up_after_one_iteration():
    p = make_problem(6, 2, 3, 80, seed=1)
    *_, info = _sizes(p, k=3, deadline=time.perf_counter() + 60.0, min_iterations=10**9)
    assert info["gave_up"] and info["iterations"] == 1


def test_exact_falls_back_to_the_ascent_when_the_sizes_give_up(monkeypatch):
    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)
    monkeypatch.setattr(ex, "SADDLE_MIN_ITERATIONS", 10**9)
    p = _conv_layer(12, 8, 238, 0)
    opt = brute_force(p, 6)[1]
    res = ex.select_exact(p, k=6, lasso=False, rel_gap=1e-7, time_limit=60.0)
    assert res.info["sizes_gave_up"] and res.info["shift_steps"] > 0 and res.info["shift_used"] == "block"
    assert res.info["root_bound"] <= opt + 1e-12 and res.bound <= opt + 1e-12
    assert res.objective == pytest.approx(opt, rel=1e-9)


def test_single_precision_newton_systems_reach_the_double_precision_bound():
    # (float32 only builds the Newton directions: feasibility is certified in float64, W refined in float64)
    p = _conv_layer(12, 8, 238, 0)
    opt = brute_force(p, 6)[1]
    *_, wr, d, val, z, info = _sizes(p, k=6, single=False)
    *_, wr1, d1, val1, z1, info1 = _sizes(p, k=6, single=True)
    assert val1 / p.target_sq <= opt * (1 + 1e-9)
    assert val1 >= 0.99 * val                            # measured: equal to 4 digits
    assert np.linalg.eigvalsh(wr1.M - np.diag(d1))[0] >= -1e-12 and np.all(d1 > 0)
    assert info1["feasibility_checks"] >= 1


def test_a_float32_newton_system_that_factors_only_when_damped_does_not_end_the_sizes(monkeypatch):
    """Where the first three regularizations of a float32 Newton system do not factor (simulated: the r×r system
    fails three times per iteration), the stronger ones step on: the sizes run all their iterations and their bound
    stays valid (before session 32 they ended at the first such system, at C = 512 3×3 with a third of their time
    left and the bound still climbing)."""
    import scipy.linalg

    import solvers.selection.perspective as pe

    p = _conv_layer(12, 8, 238, 0)
    r = whiten(p).M.shape[0]
    real = scipy.linalg.cho_factor
    fails = {"left": 0, "raised": 0}

    def flaky(A, *args, **kwargs):
        if A.shape[0] != r:                  # (the z block, factored once per iteration before the r×r system)
            fails["left"] = 3
        elif fails["left"]:
            fails["left"] -= 1
            fails["raised"] += 1
            raise np.linalg.LinAlgError("simulated: not positive definite in float32")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(pe.scipy.linalg, "cho_factor", flaky)
    opt = brute_force(p, 6)[1]
    *_, wr, d, val, z, info = _sizes(p, k=6, single=True, iterations=6)
    assert info["iterations"] == 6 and fails["raised"] >= 3 * 5
    assert 0 < val / p.target_sq <= opt * (1 + 1e-9)
    assert np.linalg.eigvalsh(wr.M - np.diag(d))[0] >= -1e-12 and np.all(d > 0)


@pytest.mark.parametrize("n", [5, 256, 300, 513])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_spd_inverse_is_the_full_symmetric_inverse(n, dtype):
    from solvers.selection.perspective import _inv_spd

    rng = np.random.default_rng(n)
    G = rng.normal(size=(n, n + 3))
    A = G @ G.T / n + np.eye(n)
    X = _inv_spd(A.astype(dtype))
    assert X.dtype == dtype and np.array_equal(X, X.T)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    assert np.abs(X @ A - np.eye(n)).max() <= tol
    assert _inv_spd(-A.astype(dtype)) is None            # not positive definite: no inverse


def test_scalar_shifts_with_single_precision_directions_stay_feasible_and_near_double(monkeypatch):
    p = _conv_layer(12, 8, 238, 0)
    w = whiten(p)
    t = ex.choose_shift(w)
    monkeypatch.setattr(ex, "SINGLE_MIN_COLUMNS", 0)
    t1 = ex.choose_shift(w)
    T = t1[w.col_group]
    assert np.linalg.eigvalsh(w.M - np.diag(T))[0] >= 0 and np.all(t1 >= 0)
    assert t1.sum() >= 0.99 * t.sum()


def test_feasibility_checks_factor_one_copy_and_decide_as_the_eigenvalues_do():
    """``_feasible`` (every block-shift step's check) holds one r×r besides ``M`` (the expression it replaced held
    five), and says what the smallest eigenvalue of ``M − blkdiag(D)`` says, away from the margin."""
    import tracemalloc

    import scipy.linalg

    from solvers.selection.perspective import MARGIN, _feasible

    p = make_problem(40, 9, 4, 3000, seed=1)
    w = whiten(p)
    lam = np.linalg.eigvalsh(w.M)[0]
    for scale, expect in [(0.5, True), (1.5, False)]:
        D = [scale * lam * np.eye(w.cols(g).stop - w.cols(g).start) for g in range(w.n_channels)]
        assert (np.linalg.eigvalsh(w.M - scipy.linalg.block_diag(*D))[0] > MARGIN) == expect
        tracemalloc.start()
        try:
            assert _feasible(w, D) == expect
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.3 * w.M.nbytes, (peak, w.M.nbytes)


@pytest.mark.parametrize("single", [False, True])
def test_sizes_hold_no_copies_of_their_matrices_for_lapack(single, monkeypatch):
    """The sizes' float32 and float64 copies of ``M`` are made in LAPACK's (Fortran) order and factored in place:
    a C-ordered copy would be copied once more inside every factorization (the same arithmetic either way)."""
    import solvers.selection.perspective as pe

    seen = []
    real = pe._factors

    def spy(A, *, single=False):
        seen.append(A.flags.f_contiguous)
        return real(A, single=single)

    monkeypatch.setattr(pe, "_factors", spy)
    _sizes(_conv_layer(12, 3, 600, seed=0), k=6, iterations=4, single=single)
    assert seen and all(seen)


@pytest.mark.parametrize("single", [False, True])
def test_sizes_factor_their_newton_system_in_its_own_memory_and_give_it_back_on_failure(single, monkeypatch):
    """The r×r Newton system is factored in place (Fortran order, ``overwrite_a``): no third r×r beside the
    iteration's two. A factorization that fails overwrote part of the system; the regularized retry sees the whole
    system again (its lower triangle restored, the diagonal regularized), and the sizes' bound is the one a
    copying factorization gives."""
    import scipy.linalg

    import solvers.selection.perspective as pe

    p = _conv_layer(12, 3, 600, seed=0)
    r = whiten(p).M.shape[0]
    real = scipy.linalg.cho_factor
    calls = {"r": 0, "inplace": 0}

    def spy(A, *args, **kwargs):
        if A.shape[0] == r:
            calls["r"] += 1
            calls["inplace"] += bool(kwargs.get("overwrite_a")) and A.flags.f_contiguous
        return real(A, *args, **kwargs)

    monkeypatch.setattr(pe.scipy.linalg, "cho_factor", spy)
    _sizes(p, k=6, iterations=4, single=single)
    assert calls["r"] >= 1 and calls["inplace"] == calls["r"]

    # a failed first attempt (simulated after LAPACK has overwritten the system) is retried on the whole system
    attempts = []

    def fail_first(A, *args, **kwargs):
        if A.shape[0] == r and not attempts:
            attempts.append(np.array(A))
            A[np.triu_indices(r)] = 0.0           # (clobbered, as a failing LAPACK factorization leaves it)
            raise np.linalg.LinAlgError("simulated")
        if A.shape[0] == r and len(attempts) == 1:
            attempts.append(np.array(A))
        return real(A, *args, **kwargs)

    monkeypatch.setattr(pe.scipy.linalg, "cho_factor", fail_first)
    _sizes(p, k=6, iterations=1, single=single)
    first, retry = attempts
    reg = pe.SINGLE_REGULARIZATIONS[1] if single else 1e-12
    np.testing.assert_array_equal(np.tril(retry, -1), np.tril(first, -1))
    np.testing.assert_array_equal(np.triu(retry, 1), np.tril(first, -1).T)
    np.testing.assert_allclose(np.diag(retry), np.diag(first) * (1 + reg), rtol=1e-6)


def test_block_ascent_inverse_from_cholesky_equals_the_lu_inverse(monkeypatch):
    """Past SINGLE_MIN_COLUMNS the ascent's ``(M − blkdiag D)⁻¹`` comes from a Cholesky factor in its one copy."""
    import solvers.selection.perspective as pe

    p = make_problem(30, 6, 4, 2000, seed=2)
    w = whiten(p)
    lam = np.linalg.eigvalsh(w.M)[0]
    D = [0.5 * lam * np.eye(w.cols(g).stop - w.cols(g).start) for g in range(w.n_channels)]
    lu = pe._inverse_minus_blocks(w, D)
    monkeypatch.setattr(pe, "SINGLE_MIN_COLUMNS", 0)
    ch = pe._inverse_minus_blocks(w, D)
    np.testing.assert_allclose(ch, lu, rtol=1e-10, atol=1e-10 * np.abs(lu).max())
    assert np.array_equal(ch, ch.T)
