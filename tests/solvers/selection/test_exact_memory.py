"""Exact selection's relaxed solves and their duals in fewer r×m arrays: the same numbers as the formulas they
replace (bit for bit where one block does it all), and no arrays left behind between nodes."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.linalg

import solvers.selection.exact as ex
from solvers.selection.greedy import whiten
from solvers.selection.panel_cholesky import PanelCholesky, factor_principal
from tests.solvers.selection.bank import make_problem


def _relaxation(C=24, cols=3, m=6, seed=3):
    p = make_problem(C=C, cols_per_channel=cols, m=m, n=300, seed=seed)
    w = whiten(p)
    return p, w, ex.Relaxation(w, ex.choose_shift(w))


def _dual_as_one_residual(rel, W, T, ridge):
    """The dual as it was computed before: the whole residual cross V (r×m) in one array."""
    N = ~T
    WT = W[T]
    V = np.empty_like(W)
    V[T] = (ridge + rel.tc[T])[:, None] * WT
    V[N] = rel.w.B[N] - rel.w.M[np.ix_(N, T)] @ WT
    L = rel.c - float(np.sum(WT * (rel.w.B[T] - V[T])))
    return L, rel._coefficients(V)


def _solve_as_before(rel, z, out):
    z = np.where(rel.shifted, z, 1.0)
    z = np.where(out, 0.0, z)
    zc = z[rel.w.col_group]
    T = zc > 0
    ridge = rel.tc[T] * (1.0 / zc[T] - 1.0)
    W = np.zeros_like(rel.w.B)
    BT = rel.w.B[T]
    W[T] = factor_principal(rel.w.M, np.flatnonzero(T), ridge, lower=False).solve(BT)
    return W, float(rel.c - np.sum(W[T] * BT)), T, ridge


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relaxed_solve_and_dual_equal_the_one_array_formulas_bit_for_bit(seed):
    p, w, rel = _relaxation(seed=seed)
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 1.0, p.n_channels)
    z[rng.choice(p.n_channels, 5, replace=False)] = 0.0
    out = np.zeros(p.n_channels, bool)
    out[rng.choice(p.n_channels, 3, replace=False)] = True
    W, F = rel.solve(z, out)
    W0, F0, T, ridge = _solve_as_before(rel, z, out)
    assert np.array_equal(W, W0) and F == F0
    L, a = rel.dual(W)
    L0, a0 = _dual_as_one_residual(rel, W, T, ridge)
    assert L == L0 and np.array_equal(a, a0)


def test_dual_in_row_blocks_equals_one_block(monkeypatch):
    """Past ``DUAL_BLOCK_ENTRIES`` the unsolved rows' residuals come a block of rows at a time (a few rows here)."""
    p, w, rel = _relaxation(C=30, seed=5)
    z = np.random.default_rng(5).uniform(0.0, 1.0, p.n_channels)
    z[:12] = 0.0
    W, _ = rel.solve(z, np.zeros(p.n_channels, bool))
    L0, a0 = rel.dual(W)
    monkeypatch.setattr(ex, "DUAL_BLOCK_ENTRIES", 7)
    L1, a1 = rel.dual(W)
    assert L1 == L0
    np.testing.assert_allclose(a1, a0, rtol=1e-12, atol=1e-15)


def test_shifted_product_in_row_blocks_is_the_expression(monkeypatch):
    p, w, rel = _relaxation(seed=4)
    W = np.random.default_rng(4).normal(size=rel.w.B.shape)
    expected = rel.w.M @ W - rel.tc[:, None] * W
    monkeypatch.setattr(ex, "SHIFT_BLOCK_ENTRIES", 5)
    assert np.array_equal(rel.shifted_product(W), expected)


def test_relax_keeps_no_weights_between_nodes():
    """After a node's Frank–Wolfe the relaxation caches none of its r×m weights (they were two per node, kept
    beside the next node's factorizations); the bound is the one the cache-free duals give."""
    p, w, rel = _relaxation(seed=6)
    S = ex._Search(p, 8, None, rel, None, 1e-4)
    nothing = np.zeros(p.n_channels, bool)
    fin, fout = nothing.copy(), nothing.copy()
    fin[[1, 4]], fout[[2, 9]] = True, True
    lb, z, L, a = ex._relax(S, fin, fout, np.full(p.n_channels, 0.5), 20, converge=True)
    assert rel._recent == []
    assert np.isfinite(lb) and lb <= p.target_sq
    out: dict = {}
    lb2, *_ = ex._relax(S, fin, fout, np.full(p.n_channels, 0.5), 20, converge=True, out=out)
    assert lb2 == lb and out["W"].shape == w.B.shape and rel._recent == []


def test_explained_energy_is_the_trace_bit_for_bit():
    p, w, _ = _relaxation(seed=7)
    mask = np.zeros(p.n_channels, bool)
    mask[::3] = True
    cm = w.col_mask(mask)
    B = w.B[cm]
    X = factor_principal(w.M, np.flatnonzero(cm), lower=False).solve(B)
    assert w.explained(mask) == float(np.sum(B * X))


def _spd(r, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(r, r + 20))
    return A @ A.T / r + np.eye(r)


def test_panel_solve_in_place_without_a_second_right_hand_side():
    """``PanelCholesky.solve(v, overwrite=True)`` works in ``v``'s memory, and its forward substitution updates the
    trailing rows in place: it allocates a few b×m panels' worth, under a third of ``v`` (the product was (r − b)×m
    beside it)."""
    r, m = 1100, 40
    A = _spd(r)
    fac = PanelCholesky.factor(lambda lo, hi: A[lo:, lo:hi].copy(), r, width=128)
    v = np.random.default_rng(1).normal(size=(r, m))
    expected = np.linalg.solve(A, v)
    copy = fac.solve(v)
    np.testing.assert_allclose(copy, expected, rtol=1e-9, atol=1e-11)
    tracemalloc.start()
    try:
        x = fac.solve(v, overwrite=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.shares_memory(x, v) and np.array_equal(x, copy)
    assert peak < 0.3 * v.nbytes, (peak, v.nbytes)


def test_lapack_solve_in_place_for_fortran_ordered_right_hand_sides():
    from solvers.selection.panel_cholesky import LapackCholesky

    A = _spd(60, seed=2)
    fac = LapackCholesky(scipy.linalg.cholesky(A, lower=True), lower=True)
    v = np.asfortranarray(np.random.default_rng(2).normal(size=(60, 7)))
    expected = fac.solve(v)
    x = fac.solve(v, overwrite=True)
    assert np.shares_memory(x, v) and np.array_equal(x, expected)
