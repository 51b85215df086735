"""Block-shift ascent (solvers.selection.perspective.optimize_shift): restarts, warm starts and early stops
keep every bound valid (checked against every subset) and behave as documented."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers.selection.exact import Relaxation, _Search, _relax, choose_shift
from solvers.selection.greedy import whiten
from solvers.selection.perspective import eig_blocks, optimize_shift, rotate
from tests.solvers.selection.bank import brute_force, make_problem


def _setup(C=8, k=4, seed=5):
    p = make_problem(C, 3, 3, 150, seed=seed, correlation=0.85)
    w = whiten(p)
    t = choose_shift(w)
    S = _Search(p, k, None, Relaxation(w, t), None, 1e-4)
    nothing = np.zeros(C, bool)

    def relax_value(wr, d, z):
        S.rel = Relaxation(wr, d)
        lb, z, _, _ = _relax(S, nothing, nothing, np.full(C, 0.5) if z is None else z, 5, converge=True)
        W, _ = S.rel.solve(z, nothing)
        return lb, z, W

    return p, w, t, S, relax_value


def _assert_valid_everywhere(p, w, D, k):
    """M − D ⪰ 0, D_g ≻ 0, and the relaxation's minorants under-estimate every subset's error."""
    C = w.n_channels
    Dm = np.zeros_like(w.M)
    for g in range(C):
        Dm[w.cols(g), w.cols(g)] = D[g]
        assert np.linalg.eigvalsh(D[g])[0] > 0
    assert np.linalg.eigvalsh(w.M - Dm)[0] >= 0
    U, d = eig_blocks(D)
    rel = Relaxation(rotate(w, U), d)
    rng = np.random.default_rng(0)
    subsets = [list(c) for r in range(C + 1) for c in itertools.combinations(range(C), r)]
    for _ in range(4):
        W, _ = rel.solve(rng.uniform(0, 1, size=C), np.zeros(C, bool))
        L, a = rel.dual(W)
        for S_ in subsets:
            m = np.zeros(C, bool)
            m[S_] = True
            assert L - a[m].sum() <= p.error(m) * p.target_sq * (1 + 1e-9) + 1e-9 * p.target_sq
    # the root bound with these shifts stays below the brute-force optimum
    S = _Search(p, k, None, rel, None, 1e-4)
    nothing = np.zeros(C, bool)
    lb, *_ = _relax(S, nothing, nothing, np.full(C, 0.5), 100, converge=True)
    assert lb / p.target_sq <= brute_force(p, k)[1] + 1e-9


def test_restarts_happen_and_keep_the_shifts_valid():
    p, w, t, S, relax_value = _setup()
    D, out = optimize_shift(w, t, relax_value, iterations=60, patience=2, restarts=3, first_patience=None)
    assert out["restarts"] >= 1                       # patience 2 forces restarts on this ascent
    assert out["best"] >= out["trace"][0]
    assert out["best"] == pytest.approx(max(out["trace"]))
    _assert_valid_everywhere(p, w, D, 4)


def test_patience_without_restarts_stops_the_ascent_early():
    _, w, t, _, relax_value = _setup()
    _, out = optimize_shift(w, t, relax_value, iterations=200, patience=1, restarts=0, first_patience=None)
    trace = out["trace"]
    assert len(trace) < 200 and out["restarts"] == 0
    assert trace[-1] <= max(trace[:-1])                # it stopped on a step without a new best


def test_warm_start_from_earlier_blocks_never_loses_their_value():
    p, w, t, _, relax_value = _setup(seed=9)
    D1, out1 = optimize_shift(w, t, relax_value, iterations=15)
    D2, out2 = optimize_shift(w, t, relax_value, iterations=15, D_init=D1)
    U, d = eig_blocks(D1)
    start_val = relax_value(rotate(w, U), d, None)[0]
    assert out2["trace"][0] == pytest.approx(start_val, rel=1e-6, abs=1e-12 * p.target_sq)
    assert out2["best"] >= out2["trace"][0]
    _assert_valid_everywhere(p, w, D2, 4)


def test_an_ascent_that_never_gains_gives_its_time_back():
    _, w, t, _, _ = _setup()
    r, C = w.M.shape[0], w.n_channels
    calls = []

    def falling(wr, d, z):                            # a relaxation whose value only falls
        calls.append(1)
        return -float(len(calls)), np.full(C, 0.5), np.zeros((r, w.B.shape[1]))

    D, out = optimize_shift(w, t, falling, iterations=100, first_patience=6, patience=None)
    assert len(out["trace"]) == 6
    assert all(np.allclose(Dg, t[g] * np.eye(Dg.shape[0])) for g, Dg in enumerate(D))   # the start is kept
