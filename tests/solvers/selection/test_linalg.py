"""Chunked products, diagonal blocks, and the LASSO's channel Gram over block-diagonal problems."""
from __future__ import annotations

import numpy as np
import scipy.linalg

from solvers.selection import linalg
from solvers.selection.lasso import channel_gram
from solvers.selection.linalg import chunked_product, diagonal_blocks, gram_of_rows
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
