"""Chunked products, diagonal blocks, and the LASSO's channel Gram over block-diagonal problems."""
from __future__ import annotations

import numpy as np
import scipy.linalg

from solvers.selection import linalg
from solvers.selection.lasso import channel_gram
from solvers.selection.linalg import chunked_product, diagonal_blocks, gram_of_rows, symmetrize_in_place
from solvers.selection.problem import SelectionProblem


def test_gram_of_rows_and_chunked_product_match_numpy(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 5))
    monkeypatch.setattr(linalg, "_GRAM_ROWS", 8)  # several row blocks on a small array
    np.testing.assert_allclose(gram_of_rows(a), a @ a.T, rtol=1e-12, atol=1e-12)
    b = rng.standard_normal((5, 11))
    np.testing.assert_allclose(chunked_product(a, b, max_bytes=8 * 11 * 4), a @ b, rtol=1e-12)
    np.testing.assert_allclose(chunked_product(a, a, transpose_a=True, max_bytes=64), a.T @ a, rtol=1e-12)


def test_diagonal_blocks_finds_the_finest_contiguous_split():
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, n)) for n in (3, 1, 4)]
    G = scipy.linalg.block_diag(*[b @ b.T for b in blocks], np.zeros((2, 2)))
    assert diagonal_blocks(G) == [(0, 3), (3, 4), (4, 8), (8, 9), (9, 10)]
    G[0, 9] = G[9, 0] = 1.0  # a link from the first to the last block merges everything between
    assert diagonal_blocks(G) == [(0, 10)]
    assert diagonal_blocks(np.ones((4, 4))) == [(0, 4)]


def test_channel_gram_of_a_block_diagonal_problem_equals_the_dense_formula():
    # A group's joint problem: two consumers (blocks), 3 columns per channel, shared units 0..3
    rng = np.random.default_rng(2)
    Gs, Bs, Ws, units = [], [], [], []
    for m, order in ((5, [0, 1, 2, 3]), (7, [2, 0, 3, 1])):
        Z = rng.standard_normal((40, 12))
        W = rng.standard_normal((12, m))
        Gs.append(Z.T @ Z)
        Bs.append(Z.T @ (Z @ W + 0.1 * rng.standard_normal((40, m))))
        Ws.append(W)
        units.append(np.repeat(order, 3))
    G, B, W = scipy.linalg.block_diag(*Gs), scipy.linalg.block_diag(*Bs), scipy.linalg.block_diag(*Ws)
    g = np.concatenate(units)
    p = SelectionProblem(G, B, 10.0, g, weights=W)
    Q, q = channel_gram(p)
    E = np.zeros((g.size, 4))
    E[np.arange(g.size), g] = 1.0
    np.testing.assert_allclose(Q, E.T @ (G * (W @ W.T)) @ E, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(q, E.T @ np.einsum("ij,ij->i", W, B), rtol=1e-12)


def test_refit_and_errors_block_by_block_equal_the_dense_formulas():
    # A joint problem above the 512-column threshold, so refit/error work per diagonal block on each
    # block's own outputs; the answers must be the plain least squares and ‖Y − ZW‖² of the whole.
    rng = np.random.default_rng(3)
    Gs, Bs, Ws, units, yy = [], [], [], [], 0.0
    for m in (4, 6, 3):
        Z = rng.standard_normal((300, 200))
        W = rng.standard_normal((200, m))
        Y = Z @ W + 0.5 * rng.standard_normal((300, m))
        Gs.append(Z.T @ Z)
        Bs.append(Z.T @ Y)
        yy += float(np.sum(Y * Y))
        Ws.append(W)
        units.append(rng.permutation(np.repeat(np.arange(50), 4)))
    G, B, W = scipy.linalg.block_diag(*Gs), scipy.linalg.block_diag(*Bs), scipy.linalg.block_diag(*Ws)
    p = SelectionProblem(G, B, yy, np.concatenate(units), weights=W)
    assert len(p.gram_blocks()) == 3
    Q, _ = channel_gram(p)     # LASSO's channel Gram, built block by block on the same blocks
    E = np.zeros((p.groups.size, 50))
    E[np.arange(p.groups.size), p.groups] = 1.0
    np.testing.assert_allclose(Q, E.T @ (G * (W @ W.T)) @ E, rtol=1e-9, atol=1e-8)
    mask = np.zeros(50, dtype=bool)
    mask[rng.choice(50, 20, replace=False)] = True
    cols = mask[p.groups]
    dense = np.zeros_like(B)
    dense[cols] = np.linalg.solve(G[np.ix_(cols, cols)] + 0.3 * np.eye(cols.sum()), B[cols])
    np.testing.assert_allclose(p.refit(mask, ridge=0.3), dense, rtol=1e-9, atol=1e-12)

    def err(Wx):
        return (yy - 2 * np.sum(Wx * B) + np.sum(Wx * (G @ Wx))) / yy

    np.testing.assert_allclose(p.error_of(dense), err(dense), rtol=1e-9)
    kept = np.where(cols[:, None], W, 0.0)
    np.testing.assert_allclose(p.error(mask, refit=False), err(kept), rtol=1e-9)
    other = rng.standard_normal(B.shape)  # arbitrary weights, not block-structured
    other[rng.random(other.shape[0]) < 0.5] = 0.0
    np.testing.assert_allclose(p.error_of(other), max(err(other), 0.0), rtol=1e-9)


def test_in_place_symmetrization_equals_the_expression():
    """Bit for bit ``(A + Aᵀ)/2``, with ragged blocks; the Gram's symmetrized copy is the same."""
    from solvers.selection.problem import _symmetric

    A = np.random.default_rng(0).normal(size=(23, 23))
    expected = 0.5 * (A + A.T)
    copy = _symmetric(A, block=4)
    symmetrize_in_place(A, block=5)
    assert np.array_equal(A, expected) and np.array_equal(copy, expected)
    assert _symmetric(A) is A                      # (already symmetric: no copy)
