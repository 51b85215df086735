"""The Cholesky factor held as column panels of its lower triangle, against LAPACK's."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from solvers.selection.panel_cholesky import PanelCholesky


def _spd(r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(r, r))
    return A @ A.T / r + 0.1 * np.eye(r)


@pytest.mark.parametrize("r, width", [(300, 64), (301, 64), (40, 512), (512, 512), (257, 1)])
def test_panels_hold_the_lower_factor_and_solve(r, width):
    A = _spd(r)
    before = A.copy()
    pc = PanelCholesky.factor(lambda lo, hi: A[lo:, lo:hi].copy(), r, width=width)
    L = np.zeros((r, r))
    for j, P in enumerate(pc.panels):
        assert P.shape == (r - j * width, min(width, r - j * width))
        L[j * width:, j * width:j * width + P.shape[1]] = P
    np.testing.assert_allclose(L, np.linalg.cholesky(A), rtol=0, atol=1e-12)
    V = np.random.default_rng(1).normal(size=(r, 3))
    np.testing.assert_allclose(pc.solve(V), np.linalg.solve(A, V), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(pc.solve(V[:, 0]), np.linalg.solve(A, V[:, 0]), rtol=1e-9, atol=1e-10)
    assert np.array_equal(A, before)


@pytest.mark.parametrize("where", [5, 150, 299])
def test_a_matrix_that_is_not_positive_definite_raises(where):
    """The failure LAPACK reports is reported too, wherever the negative direction sits (first or later panel)."""
    r = 300
    A = _spd(r)
    lam, U = np.linalg.eigh(A)
    u = np.zeros(r)
    u[where] = 1.0
    B = A - (lam[0] + (u @ A @ u)) * np.outer(u, u)          # u is now a direction of negative curvature
    assert np.linalg.eigvalsh(B)[0] < 0
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(B)
    with pytest.raises(np.linalg.LinAlgError):
        PanelCholesky.factor(lambda lo, hi: B[lo:, lo:hi].copy(), r, width=64)


def test_a_wrong_panel_shape_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        PanelCholesky.factor(lambda lo, hi: np.eye(3), 10, width=4)


def test_the_panels_need_about_half_an_r_by_r():
    r = 1200
    A = _spd(r, 2)
    tracemalloc.start()
    try:
        pc = PanelCholesky.factor(lambda lo, hi: A[lo:, lo:hi].copy(), r, width=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pc.nbytes < 0.55 * A.nbytes and peak < 0.65 * A.nbytes, (pc.nbytes, peak, A.nbytes)


@pytest.mark.parametrize("split", [0, 37, 200, 299])
def test_a_split_hands_out_the_factor_of_the_schur_complement(split):
    """With a panel boundary at ``split`` the trailing panels are the Cholesky factor of the Schur complement of
    ``A[:split, :split]``: their solves are ``S⁻¹ v`` (what the node shifts' Lanczos needs), no copy made."""
    r = 300
    A = _spd(r, 3)
    pc = PanelCholesky.factor(lambda lo, hi: A[lo:, lo:hi].copy(), r, width=64, split=split)
    assert split == 0 or split in pc.starts
    S = A[split:, split:] - (A[split:, :split] @ np.linalg.solve(A[:split, :split], A[:split, split:]) if split else 0)
    tail = pc.trailing(split)
    assert tail.r == r - split and all(p is q for p, q in zip(tail.panels, pc.panels[-len(tail.panels):]))
    V = np.random.default_rng(2).normal(size=(r - split, 2))
    np.testing.assert_allclose(tail.solve(V), np.linalg.solve(S, V), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pc.solve(np.eye(r)[:, :3]), np.linalg.solve(A, np.eye(r)[:, :3]), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="boundary"):
        pc.trailing(split + 1 if split + 1 not in pc.starts else split + 2)


@pytest.mark.parametrize("lower", [True, False])
def test_principal_factors_agree_in_panels_and_in_lapack(lower):
    """``factor_principal`` of ``M[idx][:, idx] + diag(add)``: the panel and LAPACK paths solve alike, the
    matrix read (an array or a lazily whitened Gram) is never written, and the trailing factor is the Schur
    complement's on both paths; a matrix that is not positive definite raises on both."""
    from solvers.selection.panel_cholesky import factor_principal
    from solvers.selection.scaled_gram import ScaledGram

    rng = np.random.default_rng(5)
    n = 260
    G = _spd(n, 4)
    f = 1.0 / np.sqrt(np.diag(G))
    M = ScaledGram(G, np.arange(n), f)
    before = G.copy()
    idx = np.sort(rng.choice(n, 180, replace=False))
    add = rng.random(idx.size)
    dense = (f[:, None] * G * f[None, :])[np.ix_(idx, idx)] + np.diag(add)
    V = rng.normal(size=(idx.size, 3))
    want = np.linalg.solve(dense, V)
    split = 50
    S = dense[split:, split:] - dense[split:, :split] @ np.linalg.solve(dense[:split, :split], dense[:split, split:])
    for panel_min in (10, 10**9):
        for src in (M, np.asarray(M)):
            cf = factor_principal(src, idx, add, panel_min=panel_min, split=split, lower=lower)
            np.testing.assert_allclose(cf.solve(V), want, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(cf.trailing(split).solve(V[split:]), np.linalg.solve(S, V[split:]),
                                       rtol=1e-8, atol=1e-10)
        with pytest.raises(np.linalg.LinAlgError):
            factor_principal(M, idx, add - 10.0, panel_min=panel_min, lower=lower)
    assert np.array_equal(G, before)


def test_releasing_the_lower_factor_gives_lapacks_factor_and_empties_the_panels():
    from solvers.selection.panel_cholesky import factor_principal

    rng = np.random.default_rng(4)
    A = rng.normal(size=(300, 310))
    M = A @ A.T / 300 + np.eye(300)
    pf = factor_principal(M, None, 0.0, panel_min=0)
    L = pf.release_lower(np.float32)
    assert L.dtype == np.float32 and L.flags.f_contiguous and not pf.panels
    np.testing.assert_allclose(L, np.linalg.cholesky(M), rtol=0, atol=1e-6)
