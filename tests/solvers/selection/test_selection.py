"""Every torch-free selection method against the problem bank (brute-force optima), plus input checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from solvers import InvalidInputError, SelectionResult, SolverNotAvailableError, Status
from tests.solvers.selection.bank import BANK, BANK_IDS, PLANTED, brute_force, make_problem

METHODS = ["lasso", "magnitude", "random"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_method_keeps_exactly_k_and_reports_the_refit_error(problem, k, method):
    res = solvers.select_channels(problem, k=k, method=method)
    assert isinstance(res, SelectionResult) and res.method == method
    assert res.mask.dtype == bool and res.mask.shape == (problem.n_channels,)
    assert res.k == k and res.support.size == k
    # The objective is the refitted error of the mask, never better than the true optimum.
    assert res.objective == pytest.approx(problem.error(res.mask), rel=1e-10, abs=1e-14)
    _, best = brute_force(problem, k)
    assert res.objective >= best - 1e-9
    np.testing.assert_allclose(res.weights, problem.refit(res.mask), rtol=1e-10, atol=1e-12)
    assert np.all(res.weights[~problem.column_mask(res.mask)] == 0)
    # Heuristics prove nothing: no bound, no gap (LASSO with k == C keeps all, which is optimal).
    if res.status is Status.OPTIMAL:
        assert method == "lasso" and k == problem.n_channels and res.bound == pytest.approx(res.objective)
    else:
        assert res.status is Status.FEASIBLE and res.bound is None and res.gap is None
    assert res.solve_time >= 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_refit_is_never_worse_than_keeping_the_old_weights(problem, k, method):
    res = solvers.select_channels(problem, k=k, method=method, seed=3)
    assert problem.error(res.mask) <= problem.error(res.mask, refit=False) + 1e-12


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_lasso_is_close_to_the_brute_force_optimum(problem, k):
    res = solvers.select_channels(problem, k=k, method="lasso")
    _, best = brute_force(problem, k)
    assert res.objective <= 1.1 * best + 1e-12


def test_lasso_beats_magnitude_where_channel_scales_mislead_it():
    problem, k = BANK[BANK_IDS.index("conv3x3_C8_k4")]
    lasso = solvers.select_channels(problem, k=k, method="lasso")
    magnitude = solvers.select_channels(problem, k=k, method="magnitude")
    assert lasso.objective < 0.8 * magnitude.objective


def test_lasso_recovers_a_planted_support():
    problem, k, truth = PLANTED
    res = solvers.select_channels(problem, k=k, method="lasso")
    np.testing.assert_array_equal(res.support, truth)
    assert res.objective < 1e-3


def test_lasso_recovers_a_planted_support_in_conv_like_groups():
    problem = make_problem(10, 9, 4, 300, seed=21, planted=[0, 3, 7], noise=0.01)
    res = solvers.select_channels(problem, k=3, method="lasso")
    np.testing.assert_array_equal(res.support, [0, 3, 7])


def test_random_is_reproducible_for_a_seed_and_varies_across_seeds():
    problem, k = BANK[BANK_IDS.index("dense_C12_k6")]
    a = solvers.select_channels(problem, k=k, method="random", seed=7)
    b = solvers.select_channels(problem, k=k, method="random", seed=7)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.objective == b.objective
    others = {tuple(solvers.select_channels(problem, k=k, method="random", seed=s).support) for s in range(8)}
    assert len(others) > 1


def test_magnitude_keeps_the_largest_l1_channels():
    problem, k = BANK[BANK_IDS.index("cols2_C8_k3")]
    res = solvers.select_channels(problem, k=k, method="magnitude")
    norms = problem.channel_norms(1)
    assert norms[res.mask].min() >= norms[~res.mask].max()


def test_selection_result_is_frozen():
    problem, k = BANK[0]
    res = solvers.select_channels(problem, k=k, method="magnitude")
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.objective = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.status = Status.OPTIMAL


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", METHODS)
def test_k_out_of_range_is_rejected(method):
    problem, _ = BANK[BANK_IDS.index("cols2_C8_k3")]
    with pytest.raises(InvalidInputError, match=r"k must satisfy 1 <= k <= 8; got 0"):
        solvers.select_channels(problem, k=0, method=method)
    with pytest.raises(InvalidInputError, match=r"k must satisfy 1 <= k <= 8; got -1"):
        solvers.select_channels(problem, k=-1, method=method)
    with pytest.raises(InvalidInputError, match=r"k must satisfy 1 <= k <= 8; got 9"):
        solvers.select_channels(problem, k=9, method=method)


@pytest.mark.parametrize("bad", [2.5, 3.0, "3", True, None])
def test_k_must_be_an_integer(bad):
    problem, _ = BANK[0]
    if bad is None:
        with pytest.raises(InvalidInputError, match=r"k \(channels to keep\) or budget .* must be given; got neither"):
            solvers.select_channels(problem, k=bad, method="lasso")
    else:
        with pytest.raises(InvalidInputError, match=r"k must be an integer; got"):
            solvers.select_channels(problem, k=bad, method="lasso")


def test_numpy_integer_k_is_accepted():
    problem, k = BANK[0]
    assert solvers.select_channels(problem, k=np.int64(k), method="lasso").k == k


@pytest.mark.parametrize("method", METHODS)
def test_budget_is_rejected_by_methods_that_only_take_k(method):
    problem, _ = BANK[BANK_IDS.index("costs_C10_k5")]
    with pytest.raises(InvalidInputError, match=rf"method must be one of .* with a budget; got method '{method}'"):
        solvers.select_channels(problem, budget=5.0, method=method)


def test_lasso_called_directly_rejects_a_budget_and_a_missing_k():
    from solvers.selection.lasso import select_lasso

    problem, _ = BANK[0]
    with pytest.raises(InvalidInputError, match="method 'lasso' must be given k, not a cost budget; got budget=2"):
        select_lasso(problem, k=None, budget=2)
    with pytest.raises(InvalidInputError, match="k .* must be given for method 'lasso'; got k=None"):
        select_lasso(problem, k=None)


def test_unknown_method_is_rejected():
    problem, k = BANK[0]
    with pytest.raises(InvalidInputError, match=r"method must be one of \[.*'lasso'.*\]; got 'l1'"):
        solvers.select_channels(problem, k=k, method="l1")


def test_unknown_backend_is_rejected():
    problem, k = BANK[0]
    with pytest.raises(SolverNotAvailableError, match=r"backend for method 'lasso' must be .*; got 'nosuch'"):
        solvers.select_channels(problem, k=k, method="lasso", backend="nosuch")


def test_non_positive_time_limit_is_rejected():
    problem, k = BANK[0]
    with pytest.raises(InvalidInputError, match=r"time_limit must be > 0 seconds; got 0"):
        solvers.select_channels(problem, k=k, method="lasso", time_limit=0)


def test_problem_must_be_a_selection_problem():
    with pytest.raises(InvalidInputError, match="problem must be a SelectionProblem; got dict"):
        solvers.select_channels({}, k=1)


# ------------------------------------------------------------------------------------ properties
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), C=st.integers(2, 6), cols=st.integers(1, 3), m=st.integers(1, 3),
       n=st.integers(3, 40), bits=st.integers(0, 2 ** 6 - 1), extra=st.integers(0, 5))
def test_error_never_increases_when_a_channel_is_added(seed, C, cols, m, n, bits, extra):
    problem = make_problem(C, cols, m, n, seed)
    mask = np.array([(bits >> c) & 1 for c in range(C)], dtype=bool)
    add = extra % C
    bigger = mask.copy()
    bigger[add] = True
    e_small, e_big = problem.error(mask), problem.error(bigger)
    assert 0.0 <= e_big <= e_small + 1e-9
    assert problem.error(np.zeros(C, dtype=bool)) == pytest.approx(1.0)


def test_a_requested_gap_reaches_the_exact_solver_and_is_checked():
    problem, k = BANK[0]
    loose = solvers.select_channels(problem, k=k, method="exact", gap=0.5)
    assert loose.status == solvers.Status.OPTIMAL and loose.gap <= 0.5
    tight = solvers.select_channels(problem, k=k, method="exact", gap=1e-8)
    assert tight.status == solvers.Status.OPTIMAL and tight.gap <= 1e-8
    with pytest.raises(InvalidInputError, match=r"method must be one of \['exact'\] to request a gap; got 'lasso'"):
        solvers.select_channels(problem, k=k, method="lasso", gap=0.01)
    for bad in (0, 1.5, True):
        with pytest.raises(InvalidInputError, match=rf"gap must be in \(0, 1\); got {bad}"):
            solvers.select_channels(problem, k=k, method="exact", gap=bad)


def test_method_options_reach_the_method_and_unknown_ones_are_named():
    problem, k = BANK[0]
    # an initial set reaches select_exact: it is the first incumbent it records
    start = np.zeros(problem.n_channels, bool)
    start[:k] = True
    res = solvers.select_channels(problem, k=k, method="exact", options={"initial": start, "warm_start": False})
    assert res.info["incumbents"]["initial"] == pytest.approx(problem.error(start))
    assert res.status == solvers.Status.OPTIMAL
    assert res.objective == pytest.approx(brute_force(problem, k)[1], abs=1e-9)
    with pytest.raises(InvalidInputError, match=r"method 'exact' takes no option 'worker'; its options are: .*workers"):
        solvers.select_channels(problem, k=k, method="exact", options={"worker": 2})
    with pytest.raises(InvalidInputError, match=r"method 'greedy' takes no option 'restart'; its options are: none"):
        solvers.select_channels(problem, k=k, method="greedy", options={"restart": False})
    with pytest.raises(InvalidInputError, match=r"takes no option 'time_limit'.*arguments of their own"):
        solvers.select_channels(problem, k=k, method="exact", options={"time_limit": 3})
    with pytest.raises(InvalidInputError, match="options must be a dict"):
        solvers.select_channels(problem, k=k, method="exact", options=[("restart", False)])
    # the method checks the values
    with pytest.raises(InvalidInputError, match="restart must be True or False; got 'no'"):
        solvers.select_channels(problem, k=k, method="exact", options={"restart": "no"})
