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
