"""Node-conditional perspective shifts (``select_exact(bound="conditional")``): valid at every node."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers import InvalidInputError, SelectionProblem, Status
from solvers.selection.conditional import node_shift
from solvers.selection.exact import Relaxation, _Search, _relax, choose_shift, select_exact
from solvers.selection.greedy import whiten
from tests.solvers.selection.bank import BANK, BANK_IDS, brute_force, make_problem

TIGHT = 1e-7


@pytest.fixture(autouse=True)
def _no_enumeration(monkeypatch):
    """These tests exercise the branch and bound and its bounds: keep small problems off enumeration."""
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 0)


def _mixed(C: int, cols: int, seed: int) -> SelectionProblem:
    """Ill-conditioned: every input channel is a mix of all the others (λ_min(M) tiny)."""
    rng = np.random.default_rng(seed)
    n = 60
    base = rng.normal(size=(n, C * cols))
    mix = np.eye(C * cols) + 0.9 * rng.normal(size=(C * cols, C * cols)) / np.sqrt(C * cols)
    Z = base @ mix + 3.0 * rng.normal(size=(n, 1))          # a shared component in every column
    Y = Z @ rng.normal(size=(C * cols, 3)) + 0.05 * rng.normal(size=(n, 3))
    return SelectionProblem.from_data(Z, Y, np.repeat(np.arange(C), cols))


PROBLEMS = [make_problem(8, 1, 3, 100, seed=3, correlation=0.9), make_problem(8, 3, 2, 80, seed=4, correlation=0.8),
            _mixed(8, 1, 5), _mixed(7, 2, 6)]


@pytest.mark.parametrize("p", PROBLEMS, ids=["corr_1col", "corr_3col", "mixed_1col", "mixed_2col"])
def test_node_shift_is_feasible_and_its_minorant_bounds_every_completion(p):
    C = p.n_channels
    k = C // 2
    w = whiten(p)
    t = choose_shift(w)
    root = Relaxation(w, t)
    rng = np.random.default_rng(0)
    raised = 0
    for _ in range(6):
        perm = rng.permutation(C)
        n_in, n_out = rng.integers(0, 3), rng.integers(1, 3)
        fin, fout = np.zeros(C, bool), np.zeros(C, bool)
        fin[perm[:n_in]] = True
        fout[perm[n_in:n_in + n_out]] = True
        out = node_shift(w.M, w.col_group, root.tc, fin, fout)
        assert out is not None
        tc, delta = out
        F, N = fin[w.col_group], (~(fin | fout))[w.col_group]
        T = F | N
        assert np.all(tc[~N] == 0) and np.all(tc[N] >= root.tc[N] - 1e-15) and delta >= 0
        assert np.linalg.eigvalsh(w.M[np.ix_(T, T)] - np.diag(tc[T]))[0] >= -1e-12
        raised += delta > 0
        rel = Relaxation(w, tc)
        S = _Search(p, k, None, rel, None, 1e-4)
        lb, z, L, a = _relax(S, fin, fout, np.full(C, 0.5), 30, converge=True)
        free = np.flatnonzero(~(fin | fout))
        best = np.inf
        for size in range(len(free) + 1):
            for extra in itertools.combinations(free, size):
                m = fin.copy()
                m[list(extra)] = True
                err = p.error(m) * p.target_sq
                assert L - a[m].sum() <= err * (1 + 1e-9) + 1e-10 * p.target_sq   # minorant at every set
                if m.sum() <= k:
                    best = min(best, err)
        assert lb <= best * (1 + 1e-9) + 1e-10 * p.target_sq                     # node bound <= node optimum
    assert raised > 0                                             # the conditional shift does move


@pytest.mark.parametrize("problem, k", BANK, ids=BANK_IDS)
def test_conditional_bound_finds_the_brute_force_optimum(problem, k):
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k, rel_gap=TIGHT, lasso=False, bound="conditional")
    assert res.status is Status.OPTIMAL and res.info["bound"] == "conditional"
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13)
    assert res.bound <= opt + 1e-9


@pytest.mark.parametrize("p", PROBLEMS[2:], ids=["mixed_1col", "mixed_2col"])
def test_conditional_bound_on_ill_conditioned_problems_with_a_budget_too(p):
    C = p.n_channels
    _, opt = brute_force(p, C // 2)
    res = select_exact(p, k=C // 2, rel_gap=TIGHT, lasso=False, bound="conditional")
    assert res.objective == pytest.approx(opt, rel=1e-9) and res.bound <= opt + 1e-9
    _, opt_b = brute_force(p, budget=3.0)
    res_b = select_exact(p, budget=3.0, rel_gap=TIGHT, lasso=False, bound="conditional")
    assert res_b.objective == pytest.approx(opt_b, rel=1e-9) and res_b.bound <= opt_b + 1e-9


def test_bad_bound_name_is_rejected():
    p, k = BANK[0]
    with pytest.raises(InvalidInputError, match="bound must be one of"):
        select_exact(p, k=k, bound="sdp")


@pytest.mark.parametrize("problem, k", BANK[:6], ids=BANK_IDS[:6])
def test_small_problems_are_enumerated_to_the_brute_force_optimum(problem, k, monkeypatch):
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 20_000)
    _, opt = brute_force(problem, k)
    res = select_exact(problem, k=k)
    assert res.info["enumerated"] > 0 and res.status is Status.OPTIMAL
    assert res.objective == pytest.approx(opt, rel=1e-9, abs=1e-13) and res.bound <= opt + 1e-12
    assert res.gap <= 1e-6


def test_enumeration_that_cannot_fit_falls_back_to_branch_and_bound(monkeypatch):
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 20_000)
    monkeypatch.setattr(ex, "FLOP_RATE", 1e-3)       # as if every refit took ages: not tried
    p, k = BANK[0]
    res = select_exact(p, k=k, time_limit=5)
    assert "enumerated" not in res.info and res.k <= k


def test_enumeration_pads_rank_deficient_and_dead_channels(monkeypatch):
    import solvers.selection.exact as ex

    monkeypatch.setattr(ex, "ENUMERATE_MAX", 20_000)
    rng = np.random.default_rng(3)
    n, C, q = 80, 9, 3
    Z = rng.normal(size=(n, C, q))
    Z[:, 2, 1] = Z[:, 2, 0]                      # channel 2: rank 2 of 3 columns
    Z[:, 5] = 0.0                                 # channel 5: dead
    Z = Z.reshape(n, C * q) + 0.5 * rng.normal(size=(n, 1))
    Y = Z @ rng.normal(size=(C * q, 4))
    p = SelectionProblem.from_data(Z, Y, np.repeat(np.arange(C), q))
    _, opt = brute_force(p, 4)
    res = select_exact(p, k=4)
    assert res.info["enumerated"] == 126 and res.status is Status.OPTIMAL
    assert res.objective == pytest.approx(opt, rel=1e-9) and res.bound <= opt + 1e-12


def test_node_shifts_in_panels_certify_what_lapacks_certify():
    """Past ``panel_min`` columns the node shift factors ``M_TT`` in panels with a boundary between the fixed-in
    and the free columns (the Schur complement's factor is the trailing panels): the verified shift is feasible
    and equals LAPACK's up to the Lanczos estimate's tolerance."""
    p = _mixed(30, 2, 3)                  # (60 columns from 60 samples: λ_min(M) ~ 1e-7)
    C = p.n_channels
    w = whiten(p)
    root = Relaxation(w, choose_shift(w))
    fin, fout = np.zeros(C, bool), np.zeros(C, bool)
    fin[[1, 5, 9, 22]] = True
    fout[[3, 25]] = True
    lapack = node_shift(w.M, w.col_group, root.tc, fin, fout, panel_min=10**9)
    panels = node_shift(w.M, w.col_group, root.tc, fin, fout, panel_min=8)
    assert lapack is not None and panels is not None and lapack[1] > 0      # (raised above the root's shift)
    np.testing.assert_allclose(panels[0], lapack[0], rtol=1e-3)
    T = (fin | ~fout)[w.col_group]
    A = w.M[np.ix_(T, T)] - np.diag(panels[0][T])
    assert np.linalg.eigvalsh(A)[0] >= 0.0
