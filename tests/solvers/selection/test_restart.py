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

    monkeypatch.setattr(ex, "RESTART_MIN_COLUMNS", 1500)       # the default: a small problem does not restart
    assert "restarts" not in select_exact(p, k=k, rel_gap=TIGHT, lasso=False).info


def test_restarts_nest_under_a_budget_and_keep_it():
    (p, budget) = BUDGET_BANK[BUDGET_IDS.index("costs_C10_b12")]
    _, opt = brute_force(p, budget=budget)
    res = select_exact(p, budget=budget, rel_gap=TIGHT, lasso=False)
    assert len(res.info["restarts"]) >= 2           # the restarted problem's root fixed more: it restarted too
    assert all(r["k"] is None for r in res.info["restarts"])
    assert p.costs[res.mask].sum() <= budget + 1e-12
    assert res.status is Status.OPTIMAL and res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    assert res.bound <= opt + 1e-9


def test_a_restart_keeps_the_time_limit_and_a_valid_bound(monkeypatch):
    import time

    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "RESTART_MIN_SHARE", 0.0)    # (its root fixes 4 of 48 channels: restart on any)
    p = make_problem(48, 3, 8, 400, seed=1)       # root ~1.5 s, then far from optimal
    limit = 6.0
    t0 = time.perf_counter()
    res = select_exact(p, k=24, time_limit=limit)
    assert time.perf_counter() - t0 <= limit + 1.0
    assert res.info["restarts"] and res.status is Status.TIME_LIMIT and res.k == 24
    assert 0 < res.bound <= res.objective and res.gap > 1e-4
    plain = select_exact(p, k=24, time_limit=limit, restart=False)
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
