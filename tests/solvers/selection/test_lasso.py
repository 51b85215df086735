"""The LASSO method itself: its QP data, the λ search, backends, time limits and degenerate input."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import solvers
from solvers import SelectionProblem, SolverNotAvailableError, Status
from solvers.selection.lasso import LassoQP, channel_gram, kkt_predictor, n_survivors, resolve_backend, search_lambda, select_lasso, survivors
from tests.solvers.selection.bank import BANK, BANK_IDS

cp = pytest.importorskip("cvxpy")


def _data(seed=0, n=80, C=5, cols=3, m=4, shuffle=False):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, C * cols)) + 0.5 * rng.normal(size=(n, 1))
    Y = Z @ rng.normal(size=(C * cols, m)) + 0.1 * rng.normal(size=(n, m))
    groups = np.repeat(np.arange(C), cols)
    if shuffle:
        groups = rng.permutation(groups)
    W = rng.normal(size=(C * cols, m))
    return Z, Y, groups, W


@pytest.mark.parametrize("shuffle", [False, True], ids=["contiguous", "interleaved"])
def test_channel_gram_equals_inner_products_of_materialized_contributions(shuffle):
    Z, Y, groups, W = _data(shuffle=shuffle)
    problem = SelectionProblem.from_data(Z, Y, groups, weights=W)
    Q, q = channel_gram(problem)
    contrib = [Z[:, groups == c] @ W[groups == c] for c in range(5)]  # Z_c W_c, n×m each
    Q_ref = np.array([[np.sum(a * b) for b in contrib] for a in contrib])
    q_ref = np.array([np.sum(a * Y) for a in contrib])
    np.testing.assert_allclose(Q, Q_ref, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(q, q_ref, rtol=1e-10, atol=1e-8)
    # At β = 1 the LASSO loss is the current layer's own error ‖Y − Z W‖².
    one = np.ones(5)
    loss = problem.target_sq - 2 * q @ one + one @ Q @ one
    assert loss == pytest.approx(np.sum((Y - Z @ W) ** 2), rel=1e-9)


def test_lasso_qp_matches_sklearn_lasso_on_materialized_contributions():
    from sklearn.linear_model import Lasso

    Z, Y, groups, W = _data(seed=1, C=6, cols=2)
    problem = SelectionProblem.from_data(Z, Y, groups, weights=W)
    Q, q = channel_gram(problem)
    qp = LassoQP(Q, q, resolve_backend(None))
    lam = 0.3  # in units where every β is zero from lam_max = 2 on
    beta = qp.solve(lam)
    X = np.column_stack([(Z[:, groups == c] @ W[groups == c]).ravel() for c in range(6)])
    N = X.shape[0]
    ref = Lasso(alpha=lam * qp.scale / (2 * N), fit_intercept=False, tol=1e-12, max_iter=100_000)
    ref.fit(X, Y.ravel())
    np.testing.assert_allclose(beta, ref.coef_, atol=1e-5)
    assert 0 < n_survivors(beta) < 6
    assert n_survivors(qp.solve(2.2)) == 0  # from lam_max = 2 on every channel is zero


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_returned_lambda_keeps_exactly_k_channels(problem, k):
    res = select_lasso(problem, k=k)
    if k == problem.n_channels:
        assert res.status is Status.OPTIMAL and res.iterations == 0
        return
    assert res.status is Status.FEASIBLE and res.bound is None and res.gap is None
    assert res.iterations == len(res.info["path"]) >= 1
    assert 0 < res.info["lambda"] < 1
    assert res.info["exact_count"] is True
    Q, q = channel_gram(problem)
    beta = LassoQP(Q, q, resolve_backend(None)).solve(res.info["lambda"] * 2.0)
    assert n_survivors(beta) == k
    np.testing.assert_array_equal(survivors(beta), res.mask)


def test_keeping_every_channel_needs_no_solve_and_is_optimal():
    problem, _ = BANK[0]
    C = problem.n_channels
    res = solvers.select_channels(problem, k=C, method="lasso")
    assert res.mask.all() and res.status is Status.OPTIMAL
    assert res.objective == pytest.approx(problem.error(np.ones(C, bool)))
    assert res.bound == res.objective and res.gap == 0.0


@pytest.mark.parametrize("backend", ["clarabel", "osqp", "scs", "highs", "CLARABEL"])
def test_backends_agree(backend):
    if backend.upper() not in cp.installed_solvers():
        pytest.skip(f"cvxpy solver {backend} not installed")
    for name in ("conv3x3_C8_k4", "dense_C12_k6"):
        problem, k = BANK[BANK_IDS.index(name)]
        ref = select_lasso(problem, k=k)
        res = select_lasso(problem, k=k, backend=backend)
        assert res.backend == backend.lower()
        np.testing.assert_array_equal(res.mask, ref.mask)


def test_lp_only_solvers_are_not_offered():
    if "GLOP" not in cp.installed_solvers():
        pytest.skip("GLOP not installed")
    with pytest.raises(SolverNotAvailableError, match="must be an installed cvxpy QP solver.*; got 'glop'"):
        resolve_backend("glop")


def test_time_limit_returns_k_channels_with_time_limit_status():
    problem, k = BANK[BANK_IDS.index("dense_C12_k6")]
    res = solvers.select_channels(problem, k=k, method="lasso", time_limit=1e-9)
    assert res.status is Status.TIME_LIMIT and res.k == k
    assert res.objective == pytest.approx(problem.error(res.mask))
    assert res.bound is None


# ------------------------------------------------------------------------------ the λ search
def _orthogonal_solver(q, counter):
    """Exact LASSO for Q = I: β = soft-threshold(q, λ/2)."""
    def solve(lam):
        counter.append(lam)
        return np.sign(q) * np.maximum(np.abs(q) - lam / 2, 0.0)
    return solve


def test_search_hits_exactly_k_for_every_k():
    q = np.array([1.0, 0.9, 0.7, 0.5, 0.45, 0.2, 0.1, 0.05])
    for k in range(1, 8):
        calls = []
        out = search_lambda(_orthogonal_solver(q, calls), k, 2.0, tiebreak=q)
        assert out.exact and out.mask.sum() == k
        np.testing.assert_array_equal(np.flatnonzero(out.mask), np.arange(k))
        assert out.steps == len(calls) <= 30


def test_search_with_tied_channels_cuts_at_top_k():
    q = np.array([1.0, 0.6, 0.6, 0.6, 0.2])  # channels 1–3 enter at the same λ
    calls = []
    out = search_lambda(_orthogonal_solver(q, calls), 2, 2.0, tiebreak=q)
    assert not out.exact and out.mask.sum() == 2 and out.mask[0]
    assert not out.timed_out


def test_search_stops_at_the_deadline_with_k_channels():
    q = np.array([1.0, 0.9, 0.7, 0.5, 0.45])
    calls = []
    solve = _orthogonal_solver(q, calls)
    out = search_lambda(solve, 3, 2.0, tiebreak=q, deadline=time.perf_counter() - 1.0)
    assert out.timed_out and out.mask.sum() == 3 and calls == []
    np.testing.assert_array_equal(np.flatnonzero(out.mask), [0, 1, 2])  # ranked by |q| without a solve

    def stops_after_one(lam, _n=[]):
        _n.append(lam)
        return solve(lam) if len(_n) == 1 else None  # the solver hit its time limit
    out = search_lambda(stops_after_one, 3, 2.0, tiebreak=q, lam_guess=0.05)
    assert out.timed_out and out.mask.sum() == 3


def test_search_survives_a_misleading_predictor():
    q = np.array([1.0, 0.9, 0.7, 0.5, 0.45, 0.2, 0.1, 0.05])
    calls = []

    def hugs_the_low_end(lam, beta, k):
        lo = max((l for l, c in zip(calls, counts) if c > k), default=1e-9)
        return lo * (1 + 1e-6)  # inside the bracket, but nearly useless

    counts = []
    solver = _orthogonal_solver(q, calls)

    def solve(lam):
        beta = solver(lam)
        counts.append(n_survivors(beta))
        return beta
    out = search_lambda(solve, 3, 2.0, tiebreak=q, lam_guess=1e-3, predict=hugs_the_low_end)
    assert out.exact and np.flatnonzero(out.mask).tolist() == [0, 1, 2]
    assert out.steps <= 40  # every other step bisects, so the bracket keeps shrinking


def test_path_predictor_lands_in_the_exact_lasso_path_interval():
    from sklearn.linear_model import lars_path_gram

    problem, _ = BANK[BANK_IDS.index("dense_C12_k6")]
    Q, q = channel_gram(problem)
    s = np.abs(q).max()
    predict = kkt_predictor(Q / s, q / s)
    # sklearn's LARS-lasso path (alpha = λ/2 in these units) is the reference.
    alphas, _, coefs = lars_path_gram(q / s, Q / s, n_samples=1, method="lasso")
    counts = (coefs != 0).sum(axis=0)
    for k in range(1, 12):
        lam = predict(2.0 * (1 + 1e-9), np.zeros(12), k)
        assert lam is not None
        i = np.searchsorted(-alphas, -lam / 2)  # alphas[i-1] > lam/2 >= alphas[i]
        assert counts[i] == k, (k, lam)


def test_path_predictor_is_exact_for_orthogonal_channels():
    q = np.array([0.9, -1.0, 0.3, 0.6])
    predict = kkt_predictor(np.eye(4), q)
    assert predict(2.0 * (1 + 1e-9), np.zeros(4), 2) == pytest.approx(np.sqrt(2 * 0.9 * 2 * 0.6))
    # From the solution at λ = 0.5 (all 4 active), walking up: channel 2 leaves at 0.6, 3 at 1.2.
    beta = np.sign(q) * np.maximum(np.abs(q) - 0.25, 0)
    assert predict(0.5, beta, 2) == pytest.approx(np.sqrt(2 * 0.9 * 2 * 0.6))


def test_zero_weights_fall_back_to_correlation_ranking():
    Z, Y, groups, _ = _data(seed=2)
    problem = SelectionProblem.from_data(Z, Y, groups, weights=np.zeros((15, 4)))
    res = select_lasso(problem, k=2)
    assert res.k == 2 and res.info["degenerate"] is True
    assert res.objective == pytest.approx(problem.error(res.mask))


def test_dead_channel_is_never_kept_before_live_ones():
    Z, Y, groups, _ = _data(seed=3, C=6, cols=2)
    Z[:, groups == 4] = 0.0  # channel 4 is dead: Q is singular
    problem = SelectionProblem.from_data(Z, Y, groups)
    res = select_lasso(problem, k=5)
    assert res.k == 5 and not res.mask[4]


@pytest.mark.filterwarnings("error")   # cvxpy's "Solution may be inaccurate" would fail the test
def test_more_channels_than_lasso_can_reach_stop_at_the_lambda_floor(monkeypatch):
    """Only 4 of 8 channels are live: no λ keeps k = 6. The path predictor walks to the path's end
    (4 channels) and stops there without a solve; without it (it declines when over its work cap) the
    search stops at LAMBDA_FLOOR_REL instead of halving λ into solves the backend calls inaccurate.
    Either way every live channel is kept and info says so."""
    import solvers.selection.lasso as lasso_module
    from solvers.selection.lasso import LAMBDA_FLOOR_REL

    Z, Y, groups, _ = _data(seed=4, C=8, cols=2)
    dead = [1, 3, 5, 6]
    for c in dead:
        Z[:, groups == c] = 0.0
    problem = SelectionProblem.from_data(Z, Y, groups)
    res = select_lasso(problem, k=6)
    assert res.k == 6 and res.mask[[0, 2, 4, 7]].all()
    assert res.info["lambda_floor"] is True and res.info["path_end_channels"] == 4
    assert res.iterations == 0 and res.objective == pytest.approx(problem.error(res.mask))
    monkeypatch.setattr(lasso_module, "PREDICT_WORK", 0.0)  # the predictor declines: solves find the floor
    res = select_lasso(problem, k=6)
    assert res.k == 6 and res.mask[[0, 2, 4, 7]].all() and "path_end_channels" not in res.info
    assert res.info["lambda_floor"] is True and res.info["exact_count"] is False
    assert res.info["inaccurate_solves"] == 0
    smallest = min(lam for lam, _ in res.info["path"])
    assert smallest == pytest.approx(LAMBDA_FLOOR_REL * 2.0)   # lam_max = 2 in the scaled units
    assert res.objective == pytest.approx(problem.error(res.mask))
    reachable = select_lasso(problem, k=3)   # a reachable k never touches the floor
    assert reachable.info["lambda_floor"] is False and reachable.info["exact_count"] is True


@pytest.mark.filterwarnings("error")   # scipy's LinAlgWarning (singular Q_AA) would fail the test
def test_one_sample_statistics_give_k_channels_without_warnings():
    Z, Y, groups, _ = _data(seed=5, n=1, C=6, cols=3)   # rank-1 statistics: Q is singular
    problem = SelectionProblem.from_data(Z, Y, groups)
    for k in (1, 3, 5):
        res = select_lasso(problem, k=k)
        assert res.k == k and res.info["inaccurate_solves"] == 0
        assert res.objective == pytest.approx(problem.error(res.mask))
    Q, q = channel_gram(problem)
    predict = kkt_predictor(Q / np.abs(q).max(), q / np.abs(q).max())
    assert predict(1.0, np.ones(6), 2) is None   # a singular active set: the predictor declines


def test_lasso_solve_does_not_import_torch():
    # cvxpy can use torch when it is installed; solving our LASSO must not pull it in.
    code = ("import sys, numpy as np, solvers\n"
            "p = solvers.SelectionProblem.from_data(np.eye(6) + 0.1, np.arange(12.).reshape(6, 2), [0, 0, 1, 1, 2, 2])\n"
            "assert solvers.select_channels(p, k=2, method='lasso').k == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr


def test_fista_backend_matches_the_qp_solver_and_respects_the_time_limit():
    """The numpy FISTA backend (default from FISTA_MIN_CHANNELS on) keeps the same channels as
    Clarabel, and a tiny time limit still returns k channels with TIME_LIMIT."""
    from solvers.selection.lasso import select_lasso
    from tests.solvers.selection.bank import make_problem

    p = make_problem(24, 2, 4, 300, seed=7)
    ref = select_lasso(p, k=10, backend="clarabel")
    fista = select_lasso(p, k=10, backend="fista")
    assert fista.backend == "fista" and fista.k == 10
    assert np.array_equal(fista.mask, ref.mask)
    assert fista.objective == pytest.approx(ref.objective, rel=1e-9)
    quick = select_lasso(p, k=10, backend="fista", time_limit=1e-4)
    assert quick.k == 10 and quick.status.value in ("time_limit", "feasible")


def test_active_cholesky_follows_adds_and_removals():
    # the predictor's factor of Q_AA, updated per event, equals a fresh Cholesky of the active block
    from solvers.selection.lasso import _ActiveCholesky

    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, 12))
    Q = X.T @ X
    chol = _ActiveCholesky(Q, np.array([3, 0, 7]), room=2)  # room grows past 2
    for j in (5, 11, 1):
        assert chol.add(j)
    for j in (0, 11, 3):
        chol.remove(j)
        A = chol.order
        np.testing.assert_allclose(chol.L, np.linalg.cholesky(Q[np.ix_(A, A)]), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(chol.rows, Q[A])
        b = rng.standard_normal(len(A))
        np.testing.assert_allclose(chol.solve(b), np.linalg.solve(Q[np.ix_(A, A)], b), rtol=1e-9)
    Qs = Q.copy()
    Qs[:, 2] = Qs[2, :] = Q[:, 5]  # channel 2 duplicates channel 5's column: in the span
    Qs[2, 2] = Q[5, 5]
    dup = _ActiveCholesky(Qs, np.array([5]), room=4)
    assert not dup.add(2) and dup.order == [5]


def test_path_points_certified_by_the_optimality_conditions_skip_fista(monkeypatch):
    """The predictor's β at its proposed λ is accepted when it meets the LASSO's KKT conditions (no
    FISTA run); the channels kept are those FISTA's confirmation keeps, and a β off the path fails."""
    import solvers.selection.lasso as lasso_module

    Z, Y, groups, _ = _data(seed=7, n=300, C=24, cols=2)
    problem = SelectionProblem.from_data(Z, Y, groups)
    res = select_lasso(problem, k=9, backend="fista")
    assert res.k == 9 and res.info["kkt_certified"] >= 1 and res.info["exact_count"]
    monkeypatch.setattr(lasso_module.FistaLasso, "kkt_holds", lambda self, beta, lam, rtol=0: False)
    confirmed = select_lasso(problem, k=9, backend="fista")
    assert confirmed.info["kkt_certified"] == 0
    np.testing.assert_array_equal(res.mask, confirmed.mask)
    monkeypatch.undo()
    Q, q = channel_gram(problem)
    scale = float(np.max(np.abs(q)))
    qp = lasso_module.FistaLasso(Q / scale, q)
    beta = qp.solve(0.3)
    assert qp.kkt_holds(beta, 0.3, rtol=1e-4)
    wrong = beta.copy()
    wrong[np.argmax(np.abs(beta))] *= 1.1
    assert not qp.kkt_holds(wrong, 0.3, rtol=1e-4)


def test_path_predictor_stays_on_the_path_through_ties_of_ill_conditioned_statistics():
    """Channels that are mixes of a few shared factors (cond(Q) ~ 1e5) put channels at their boundary
    together; the walk must not skip one of them (before, it left the path: a kept channel's β took
    the wrong sign at k = 100). Every proposal meets the LASSO's optimality conditions, and for the
    k near the end of the path they hold only to the round-off of evaluating them."""
    from solvers.selection.lasso import FistaLasso

    rng = np.random.default_rng(0)
    factors = rng.standard_normal((2000, 60))
    Z = factors @ rng.standard_normal((60, 300)) + 0.1 * rng.standard_normal((2000, 300))
    Y = factors @ rng.standard_normal(60) + 0.1 * rng.standard_normal(2000)
    Q, q = Z.T @ Z, Z.T @ Y
    s = float(np.abs(q).max())
    predict = kkt_predictor(Q / s, q / s)
    qp = FistaLasso(Q / s, q)
    for k in (20, 100, 200):
        lam = predict(2.0 * (1 + 1e-9), np.zeros(300), k)
        assert lam is not None, k
        beta = predict.last[1]
        assert np.count_nonzero(beta) == k and qp.kkt_holds(beta, lam), k
    wrong = beta.copy()
    wrong[np.flatnonzero(beta)[0]] *= 1.001
    assert not qp.kkt_holds(wrong, lam)
