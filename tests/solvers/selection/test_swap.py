"""Swap local search: rank-r updates against fresh factorizations, scores against refits, never worse."""
from __future__ import annotations

import numpy as np
import pytest

from solvers import Status, select_channels
from solvers.selection.greedy import whiten
from solvers.selection.swap import SwapState, swap_search
from tests.solvers.selection.bank import BANK, BANK_IDS, BUDGET_BANK, BUDGET_IDS, brute_force, make_greedy_trap, make_problem


def _sorted_state(st: SwapState):
    so, oo = np.argsort(st.scols), np.argsort(st.ocols)
    return st.Minv[np.ix_(so, so)], st.W[so], st.K[np.ix_(so, oo)], st.R[oo]


def _assert_matches_a_fresh_state(st: SwapState, w) -> None:
    """``st`` (after incremental swaps) equals the state factored from scratch for its set."""
    ref = SwapState(w, st.mask)
    for a, b in zip(_sorted_state(st), _sorted_state(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    for h in st.out:
        np.testing.assert_allclose(st.Sig[h], ref.Sig[h], rtol=1e-8, atol=1e-10)
    assert st.explained == pytest.approx(w.explained(st.mask), rel=1e-9)


def test_incremental_updates_match_a_fresh_factorization():
    p = make_problem(12, 3, 4, 200, seed=3)
    w = whiten(p)
    mask = np.zeros(12, bool)
    mask[[0, 2, 5, 7, 9]] = True
    st = SwapState(w, mask)
    rng = np.random.default_rng(0)
    for _ in range(8):
        st.swap(int(rng.choice(st.kept)), int(rng.choice(st.out)))
        _assert_matches_a_fresh_state(st, w)


def _swap_gains(w, mask: np.ndarray) -> dict:
    """Explained energy gained by every (kept, dropped) swap, each set refitted from scratch."""
    base = w.explained(mask)
    deltas = {}
    for g in np.flatnonzero(mask):
        for h in np.flatnonzero(~mask):
            m = mask.copy()
            m[g], m[h] = False, True
            deltas[(g, h)] = w.explained(m) - base
    return deltas


def test_best_swap_is_the_best_refit_among_all_pairs():
    p = make_problem(10, 2, 3, 150, seed=5)
    w = whiten(p)
    mask = np.zeros(10, bool)
    mask[[1, 3, 4, 8]] = True
    g, h, delta = SwapState(w, mask).best_swap()
    deltas = _swap_gains(w, mask)
    best = max(deltas, key=deltas.get)
    assert (g, h) == best
    assert delta == pytest.approx(deltas[best], rel=1e-7)


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_swap_method_is_never_worse_than_its_starts(problem, k):
    res = select_channels(problem, k=k, method="swap")
    assert res.method == "swap" and res.status is Status.FEASIBLE and res.bound is None and res.k == k
    assert res.objective == pytest.approx(problem.error(res.mask), rel=1e-12)
    assert res.objective >= brute_force(problem, k)[1] - 1e-12
    for other in ("backward", "greedy"):
        assert res.objective <= select_channels(problem, k=k, method=other).objective * (1 + 1e-9) + 1e-14


def test_swap_escapes_the_greedy_trap():
    p = make_greedy_trap(6, 2, 120, seed=12)
    start = np.zeros(6, bool)
    start[[2, 4]] = True                      # the trap: the noisy proxy and a distractor
    found, swaps = swap_search(p, start)
    assert swaps >= 1 and found.sum() == 2
    assert p.error(found) == pytest.approx(brute_force(p, 2)[1], rel=1e-9)


@pytest.mark.parametrize("problem, budget", BUDGET_BANK, ids=BUDGET_IDS)
def test_swap_respects_the_budget(problem, budget):
    res = select_channels(problem, budget=budget, method="swap")
    assert problem.costs[res.mask].sum() <= budget + 1e-9
    assert res.objective >= brute_force(problem, budget=budget)[1] - 1e-12
    assert res.objective <= select_channels(problem, budget=budget, method="backward").objective * (1 + 1e-9) + 1e-14


def test_collinear_and_dead_channels_stay_finite():
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(200, 12))
    Z[:, 2:4] = 0.0                 # channel 1 is dead
    Z[:, 8:10] = Z[:, 0:2]          # channel 4 duplicates channel 0
    Y = Z @ rng.normal(size=(12, 3))
    from solvers import SelectionProblem

    p = SelectionProblem.from_data(Z, Y, np.repeat(np.arange(6), 2))
    res = select_channels(p, k=3, method="swap")
    assert res.k == 3 and np.all(np.isfinite(res.weights))
    assert res.objective == pytest.approx(brute_force(p, 3)[1], rel=1e-7, abs=1e-10)


def test_backward_and_swap_keep_the_time_limit_when_the_inverse_cannot_fit(monkeypatch):
    """When the r×r inverse backward starts from cannot finish in time, backward falls back to forward
    selection (flagged, TIME_LIMIT) and swap starts from forward: both still return k channels."""
    import solvers.selection.greedy as greedy_mod
    from solvers import select_channels
    from tests.solvers.selection.bank import make_problem

    p = make_problem(12, 2, 3, 200, seed=11)
    monkeypatch.setattr(greedy_mod, "FLOP_RATE", 1e-3)          # as if r were in the tens of thousands
    back = select_channels(p, k=5, method="backward", time_limit=30)
    assert back.k == 5 and back.status.value == "time_limit" and "fallback" in back.info
    sw = select_channels(p, k=5, method="swap", time_limit=30)
    assert sw.k == 5 and sw.info["start"] == "greedy" and sw.info["swaps"] == 0
    assert sw.objective == pytest.approx(back.objective, rel=1e-12)     # both are forward's set


def test_pair_scores_in_small_chunks_pick_the_same_swap(monkeypatch):
    """Pair scores come in chunks of kept channels (at most 1/PAIR_CHUNK_SHARE of all pairs, so the batch stays
    small beside the state); padded channels (fewer columns than the widest, dead ones) read zeros without padded
    copies of ``Minv`` and ``K``: any chunking scores every pair alike."""
    import solvers.selection.swap as sw

    from solvers import SelectionProblem

    rng = np.random.default_rng(9)
    sizes = np.array([3, 1, 2, 3, 1, 1, 2, 3, 2, 1, 3, 2, 1, 2])
    Z = rng.normal(size=(300, sizes.sum())) @ (np.eye(sizes.sum()) + 0.3 * rng.normal(size=(sizes.sum(),) * 2))
    Z[:, 1] = Z[:, 0]                           # (a repeated column: channel 0 keeps 2 whitened directions of 3)
    p = SelectionProblem.from_data(Z, Z @ rng.normal(size=(sizes.sum(), 4)), np.repeat(np.arange(14), sizes))
    w = whiten(p)
    mask = np.zeros(14, bool)
    mask[[0, 2, 5, 6, 9, 12]] = True
    whole = SwapState(w, mask).best_swap()
    monkeypatch.setattr(sw, "PAIR_CHUNK", 1)
    chunked = SwapState(w, mask).best_swap()
    assert chunked[:2] == whole[:2] and chunked[2] == pytest.approx(whole[2], rel=1e-12)
    ragged = np.diff(w.starts)
    assert ragged.min() < ragged.max()         # (padded positions were read)
    deltas = _swap_gains(w, mask)
    assert whole[:2] == max(deltas, key=deltas.get)
    assert whole[2] == pytest.approx(max(deltas.values()), rel=1e-7)


def _ragged_problem(seed: int = 9):
    from solvers import SelectionProblem

    rng = np.random.default_rng(seed)
    sizes = np.array([3, 1, 2, 3, 1, 1, 2, 3, 2, 1, 3, 2, 1, 2])
    Z = rng.normal(size=(300, sizes.sum())) @ (np.eye(sizes.sum()) + 0.3 * rng.normal(size=(sizes.sum(),) * 2))
    Z[:, 1] = Z[:, 0]                           # (a repeated column: channel 0 keeps 2 whitened directions of 3)
    return SelectionProblem.from_data(Z, Z @ rng.normal(size=(sizes.sum(), 4)), np.repeat(np.arange(14), sizes))


def test_in_place_swaps_of_ragged_channels_match_a_fresh_factorization(monkeypatch):
    """The state is updated inside buffers with one channel's room, a few rows at a time (``UPDATE_CHUNK`` shrunk
    so every update takes several blocks): swaps between channels of different widths move rows and columns
    to the ends of the views, outgrow the room (and rebuild), and still equal a state factored from scratch."""
    import solvers.selection.swap as sw

    monkeypatch.setattr(sw, "UPDATE_CHUNK", 7)
    w = whiten(_ragged_problem())
    mask = np.zeros(14, bool)
    mask[[0, 2, 5, 6, 9, 12]] = True
    st = SwapState(w, mask)
    rng = np.random.default_rng(4)
    rebuilt = 0
    sizes = np.diff(w.starts)
    for i in range(25):
        if i < 6:                               # wide out, narrow in: the dropped side outgrows its room
            g = max(st.kept, key=lambda c: sizes[c])
            h = min((c for c in st.out if sizes[c]), key=lambda c: sizes[c])
        else:
            g, h = int(rng.choice(st.kept)), int(rng.choice(st.out))
        rebuilt += not st._fits(g, h)
        st.swap(g, h)
        _assert_matches_a_fresh_state(st, w)
    assert 0 < rebuilt < 25                     # (both paths ran)


def test_a_swap_allocates_no_second_copy_of_the_state(monkeypatch):
    """A swap updates ``Minv`` (s×s) and ``K`` (s×o) in place: its traced peak stays far below their size (the
    copies it used to make were two of each; the row blocks are shrunk to the size of this small state)."""
    import tracemalloc

    import solvers.selection.swap as sw

    p = make_problem(300, 1, 8, 900, seed=2)
    w = whiten(p)
    mask = np.zeros(300, bool)
    mask[::2] = True
    st = SwapState(w, mask)
    monkeypatch.setattr(sw, "UPDATE_CHUNK", 1024)
    state = st.Minv.nbytes + st.K.nbytes
    tracemalloc.start()
    try:
        for g, h in [(0, 1), (2, 3), (1, 5)]:
            tracemalloc.reset_peak()
            st.swap(g, h)
            assert tracemalloc.get_traced_memory()[1] < 0.25 * state
    finally:
        tracemalloc.stop()
    _assert_matches_a_fresh_state(st, w)


def test_backward_starts_only_where_its_inverse_fits_beside_the_statistics(monkeypatch):
    """Past ``BACKWARD_START_MAX_COLUMNS`` whitened columns (held as an array) swap and exact's warm start skip
    backward elimination, whose r×r inverse would double the memory: they start from forward selection."""
    import solvers.selection.greedy as gr
    from solvers.selection.exact import select_exact

    p = make_problem(12, 2, 3, 200, seed=11)
    both = select_channels(p, k=5, method="swap", time_limit=30)
    assert both.info["start_error"] is not None                      # (two starts compared)
    assert "backward" in select_exact(p, k=5, time_limit=30).info["incumbents"]
    monkeypatch.setattr(gr, "BACKWARD_START_MAX_COLUMNS", 24)        # (this problem has 24 columns)
    one = select_channels(p, k=5, method="swap", time_limit=30)
    assert one.info["start"] == "greedy" and one.info["start_error"] is None
    ex = select_exact(p, k=5, time_limit=30)
    assert "backward" not in ex.info["incumbents"] and "greedy" in ex.info["incumbents"]


def test_select_swap_searches_from_both_starts_and_keeps_the_better_local_optimum():
    """Swap search ends in a local optimum that depends on its start: here backward's set is the better start but
    the swaps from greedy's end lower; select_swap returns that one (it searched from backward's only before)."""
    from solvers.selection.greedy import backward_mask, forward_mask
    from solvers.selection.swap import select_swap

    p, k = make_problem(30, 1, 4, 60, 2, correlation=0.95), 10
    g, b = forward_mask(p, k, None), backward_mask(p, k, None)
    assert p.error(b) < p.error(g)
    from_g, from_b = p.error(swap_search(p, g)[0]), p.error(swap_search(p, b)[0])
    assert from_g < from_b * (1 - 1e-4)
    res = select_swap(p, k=k)
    assert res.objective == pytest.approx(from_g, rel=1e-9) and res.info["start"] == "greedy"
    assert res.info["swap_errors"]["backward"] == pytest.approx(from_b, rel=1e-9)
    assert res.info["start_error"] == pytest.approx(p.error(g), rel=1e-9)
