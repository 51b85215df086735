"""Forward / backward greedy selection on the Gram (rank-r updates) against naive refit-per-candidate."""
from __future__ import annotations

import numpy as np
import pytest

from solvers import SelectionProblem, Status, select_channels
from solvers.selection.greedy import backward_mask, forward_mask, forward_path, whiten
from solvers.selection.swap import improve_by_swaps
from tests.solvers.selection.bank import BANK, BANK_IDS, BUDGET_BANK, BUDGET_IDS, brute_force, make_greedy_trap, make_problem


def naive_forward(p: SelectionProblem, k: int) -> list[int]:
    chosen: list[int] = []
    for _ in range(k):
        errs = {g: p.error(p.mask_from_support(chosen + [g])) for g in range(p.n_channels) if g not in chosen}
        chosen.append(min(errs, key=lambda g: (errs[g], g)))
    return chosen


def naive_backward(p: SelectionProblem, k: int) -> np.ndarray:
    keep = np.ones(p.n_channels, bool)
    while keep.sum() > k:
        errs = {}
        for g in np.flatnonzero(keep):
            m = keep.copy()
            m[g] = False
            errs[g] = p.error(m)
        keep[min(errs, key=lambda g: (errs[g], g))] = False
    return keep


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_forward_and_backward_match_naive_refits(problem, k):
    fwd = forward_mask(problem, k, None)
    naive = naive_forward(problem, k)
    assert np.array_equal(np.flatnonzero(fwd), np.sort(naive)) or \
        problem.error(fwd) == pytest.approx(problem.error(problem.mask_from_support(naive)), rel=1e-9)
    bwd = backward_mask(problem, k, None)
    assert problem.error(bwd) == pytest.approx(problem.error(naive_backward(problem, k)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method", ["greedy", "backward"])
@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_greedy_methods_keep_k_and_never_beat_the_optimum(problem, k, method):
    res = select_channels(problem, k=k, method=method)
    _, opt = brute_force(problem, k)
    assert res.k == k and res.status is Status.FEASIBLE and res.bound is None and res.gap is None
    assert res.method == method
    assert res.objective == pytest.approx(problem.error(res.mask), rel=1e-12)
    assert res.objective >= opt - 1e-12


def test_forward_greedy_falls_into_the_trap_backward_does_not():
    p = make_greedy_trap(6, 2, 120, seed=12)
    mask_opt, opt = brute_force(p, 2)
    fwd = select_channels(p, k=2, method="greedy")
    bwd = select_channels(p, k=2, method="backward")
    assert fwd.mask[2] and fwd.objective > 10 * opt           # took the noisy proxy first
    assert bwd.objective == pytest.approx(opt, rel=1e-9)


@pytest.mark.parametrize("method", ["greedy", "backward"])
@pytest.mark.parametrize("problem, budget", BUDGET_BANK, ids=BUDGET_IDS)
def test_budgets_are_respected_and_maximal(problem, budget, method):
    res = select_channels(problem, budget=budget, method=method)
    spent = problem.costs[res.mask].sum()
    assert spent <= budget + 1e-12
    # maximal: no dropped channel still fits (adding one never increases the error)
    assert all(problem.costs[g] > budget - spent + 1e-12 for g in np.flatnonzero(~res.mask))
    assert res.objective >= brute_force(problem, budget=budget)[1] - 1e-12


def test_budget_picks_by_error_reduction_per_unit_cost():
    # channel 0 explains the most but costs 10; channels 1 and 2 explain less each, cost 1
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(400, 3))
    Y = (3.0 * Z[:, :1] + 2.5 * Z[:, 1:2] + 2.5 * Z[:, 2:3]) + 0.01 * rng.normal(size=(400, 1))
    p = SelectionProblem.from_data(Z, Y, [0, 1, 2], costs=[10.0, 1.0, 1.0])
    res = select_channels(p, budget=10.0, method="greedy")
    assert list(res.support) == [1, 2]                        # 0.9 per unit of cost vs 6.25 each
    assert res.objective < p.error(np.array([True, False, False]))


def test_k_and_budget_together():
    p, budget = BUDGET_BANK[1]
    for method in ("greedy", "backward"):
        res = select_channels(p, k=3, budget=budget, method=method)
        assert res.k <= 3 and p.costs[res.mask].sum() <= budget + 1e-12


def test_forward_path_is_the_nested_greedy_curve():
    p = make_problem(10, 3, 4, 150, seed=3)
    order, errors = forward_path(p)
    assert sorted(order) == list(range(10))
    assert np.all(np.diff(errors) <= 1e-15)
    for k in (1, 4, 10):
        assert errors[k - 1] == pytest.approx(p.error(p.mask_from_support(order[:k])), rel=1e-8, abs=1e-12)
    assert np.array_equal(np.sort(order[:4]), np.flatnonzero(forward_mask(p, 4, None)))


@pytest.mark.parametrize("batch", [2, 3, 10])
def test_batched_forward_path_gives_exact_prefix_errors(batch):
    # gains scored once per batch, the batch added as one block: each entry is still the refit error
    # of its prefix, and the first batch is the top gains of the empty set
    p = make_problem(12, 3, 4, 150, seed=5)
    order, errors = forward_path(p, batch=batch)
    assert sorted(order) == list(range(12))
    for k in range(1, 13):
        assert errors[k - 1] == pytest.approx(p.error(p.mask_from_support(order[:k])), rel=1e-8, abs=1e-12)
    single = [p.error(p.mask_from_support([g])) for g in range(12)]
    assert list(order[:batch]) == sorted(range(12), key=lambda g: (single[g], g))[:batch]
    with pytest.raises(Exception, match="batch"):
        forward_path(p, batch=0)


def test_block_diagonal_refit_and_error_equal_the_dense_solve():
    import scipy.linalg

    rng = np.random.default_rng(4)
    Gs, Bs = [], []
    for d in (300, 400):  # > 512 kept columns together: the block path runs
        Z = rng.standard_normal((500, d))
        Gs.append(Z.T @ Z)
        Bs.append(Z.T @ rng.standard_normal((500, 3)))
    G, B = scipy.linalg.block_diag(*Gs), scipy.linalg.block_diag(*Bs)
    p = SelectionProblem(G, B, 1e4, np.arange(700) // 2)
    mask = np.ones(350, bool)
    mask[::7] = False
    W = p.refit(mask, ridge=1e-3)
    cols = p.column_mask(mask)
    dense = np.linalg.solve(G[np.ix_(cols, cols)] + 1e-3 * np.eye(cols.sum()), B[cols])
    np.testing.assert_allclose(W[cols], dense, rtol=1e-8, atol=1e-10)
    assert np.all(W[~cols] == 0)
    expect = 1e4 - 2 * np.sum(W * B) + np.sum(W * (G @ W))
    assert p.error_of(W) == pytest.approx(max(expect, 0) / 1e4, rel=1e-9)


def test_swaps_never_hurt_and_keep_the_size():
    p = make_greedy_trap(6, 2, 120, seed=12)
    start = forward_mask(p, 2, None)
    better = improve_by_swaps(p, start)
    assert better.sum() == 2 and p.error(better) <= p.error(start)
    assert p.error(better) == pytest.approx(brute_force(p, 2)[1], rel=1e-9)


def test_dead_and_duplicate_channels_are_handled():
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(200, 12))
    Z[:, 2:4] = 0.0                 # channel 1 (columns 2, 3) is dead
    Z[:, 8:10] = Z[:, 0:2]          # channel 4 duplicates channel 0
    Y = Z @ rng.normal(size=(12, 3))
    p = SelectionProblem.from_data(Z, Y, np.repeat(np.arange(6), 2))
    w = whiten(p)
    assert w.starts[2] - w.starts[1] == 0                    # the dead channel has no whitened columns
    for method in ("greedy", "backward"):
        res = select_channels(p, k=3, method=method)
        assert res.k == 3 and not res.mask[1]
        assert res.objective >= brute_force(p, 3)[1] - 1e-12
        assert np.all(np.isfinite(res.weights))


def test_whiten_matches_the_dense_transform_with_unsorted_and_rank_deficient_channels():
    rng = np.random.default_rng(11)
    Z = rng.normal(size=(80, 9))
    Z[:, 4] = Z[:, 1] + Z[:, 7]                       # channel 1 (columns 1, 4, 7) has rank 2
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])    # interleaved columns
    Y = Z @ rng.normal(size=(9, 2))
    p = SelectionProblem.from_data(Z, Y, groups)
    w = whiten(p)
    assert list(np.diff(w.starts)) == [3, 2, 3]
    for g in range(3):
        np.testing.assert_allclose(w.M[w.cols(g), w.cols(g)], np.eye(w.starts[g + 1] - w.starts[g]), atol=1e-9)
    for S in ([0], [1], [2], [0, 1], [1, 2], [0, 1, 2]):
        m = p.mask_from_support(S)
        assert max(p.target_sq - w.explained(m), 0) / p.target_sq == pytest.approx(p.error(m), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("method", ["greedy", "backward", "swap"])
def test_a_time_limit_still_returns_k_channels(method):
    p = make_problem(40, 3, 4, 300, seed=2)
    res = select_channels(p, k=20, method=method, time_limit=1e-6)
    assert res.k == 20 and res.status is Status.TIME_LIMIT
    assert res.objective == pytest.approx(p.error(res.mask), rel=1e-12)
    free = select_channels(p, k=20, method=method)
    assert free.status is Status.FEASIBLE and free.objective <= res.objective * (1 + 1e-9)


@pytest.mark.parametrize("use_budget", [False, True])
def test_large_groups_add_channels_in_batches_and_stay_feasible_and_close(use_budget, monkeypatch):
    """Past ``FORWARD_BATCH_MIN_CHANNELS`` forward selection scores the gains once per batch of about
    ``k / FORWARD_ROUNDS`` channels: far fewer scorings, the same size / budget rules, nearly the same error."""
    import solvers.selection.greedy as gr

    p, budget = BUDGET_BANK[1] if use_budget else (make_problem(40, 2, 6, 400, seed=11), None)
    k = None if use_budget else 20
    exact_order = forward_mask(p, k, budget)
    calls = {"n": 0}
    real = gr.ForwardState.gains

    def counted(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(gr.ForwardState, "gains", counted)
    monkeypatch.setattr(gr, "FORWARD_BATCH_MIN_CHANNELS", 8)
    monkeypatch.setattr(gr, "FORWARD_ROUNDS", 4)
    batched = forward_mask(p, k, budget)
    if use_budget:
        spent = p.costs[batched].sum()
        assert spent <= budget + 1e-12
        assert all(p.costs[g] > budget - spent + 1e-12 for g in np.flatnonzero(~batched))   # still maximal
    else:
        assert batched.sum() == k and calls["n"] <= 5            # 4 rounds of 5 (20 scorings one at a time)
        assert p.error(batched) <= 1.05 * p.error(exact_order)


def test_forward_selection_sizes_its_basis_for_k_channels_and_still_grows_past_it(monkeypatch):
    """The basis holds at most the k widest channels' columns (sized up front: at C = 11,008 the doubling buffer
    took 1.1 GB where 0.48 suffice); a start set wider than that still fits (the buffer grows)."""
    import solvers.selection.greedy as gr

    p = make_problem(12, 3, 4, 150, seed=5)
    seen = []
    real = gr.ForwardState.__init__

    def spy(self, w, columns=None):
        real(self, w, columns)
        seen.append((columns, self._Kt.shape[0]))

    monkeypatch.setattr(gr.ForwardState, "__init__", spy)
    mask = forward_mask(p, 4, None)
    assert seen[-1] == (12, 12)                               # 4 channels × 3 columns
    order, _ = forward_path(p, k_max=4)
    assert np.array_equal(mask, p.mask_from_support(order[:4]))   # the same greedy choice
    wide = forward_mask(p, 4, None, start=p.mask_from_support([0, 1, 2, 3, 4, 5]))
    assert wide.sum() == 6 and p.error(wide) <= p.error(p.mask_from_support([0, 1, 2, 3, 4, 5])) + 1e-12


@pytest.mark.parametrize("dead, shuffled", [(False, False), (True, True)])
def test_one_column_whitening_in_one_pass_matches_the_per_channel_loop(dead, shuffled, monkeypatch):
    """Large one-column groups are whitened by one vectorized scaling ``F G F``: the same whitened problem as the
    per-channel loop (to round-off), exactly symmetric, dead channels dropped, the same transforms."""
    import solvers.selection.greedy as gr

    rng = np.random.default_rng(0)
    C, n = 40, 160
    Z = rng.normal(size=(n, C)) @ (np.eye(C) + 0.1 * rng.normal(size=(C, C)))
    if dead:
        Z[:, [3, 7]] = 0.0
    Y = Z[:, :5] @ rng.normal(size=(5, 4)) + 0.1 * rng.normal(size=(n, 4))
    p = SelectionProblem.from_data(Z, Y, rng.permutation(C) if shuffled else np.arange(C))
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 10**9)
    w0, T0 = whiten(p, transforms=True)
    monkeypatch.setattr(gr, "WHITEN_VECTOR_MIN_CHANNELS", 0)
    w1, T1 = whiten(p, transforms=True)
    np.testing.assert_allclose(w1.M, w0.M, rtol=0, atol=1e-14)
    np.testing.assert_allclose(w1.B, w0.B, rtol=1e-14)
    assert np.array_equal(w1.M, w1.M.T) and np.array_equal(w1.col_group, w0.col_group)
    assert np.array_equal(w1.starts, w0.starts) and w1.M.shape[0] == C - 2 * dead
    assert all(a.shape == b.shape and np.allclose(a, b) for a, b in zip(T0, T1))
    mask = np.zeros(C, bool)
    mask[[0, 5, 9, 20]] = True
    assert w1.explained(mask) == pytest.approx(w0.explained(mask), rel=1e-12)
