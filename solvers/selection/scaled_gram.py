"""The whitened Gram of a one-column group, read from the statistics on access instead of copied.

With one column per channel, whitening is a diagonal scaling: ``M = F G_PP F`` (``F = diag(f)``,
``f_j = G_jj^{-1/2}``, ``P`` the live channels), with a unit diagonal. :class:`ScaledGram` is that matrix
without its r×r copy: every read gathers the entries from ``G`` (the caller's statistics, never written)
and scales them, in row blocks. At C = 11,008 the copy is 0.97 GB, as large as the statistics
themselves; forward selection needs only the columns of the channels it adds, exact's fallback ascent
only products ``M @ W`` and the r×r buffer it factors.

Reads equal the dense matrix (:meth:`ScaledGram.dense`) bit for bit: each entry is ``G_ij · (f_i·f_j)``
with the product of the scales taken first, so ``M`` is exactly symmetric, and the diagonal is 1.
Products ``M @ X`` are ``F (G_PP (F X))``, equal to the dense product up to round-off.
Anything else numpy asks of it (``np.asarray``, arithmetic) gets the dense matrix, built on the spot.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ScaledGram", "gathered_product"]

_BLOCK_ENTRIES = 1 << 20        # entries of G gathered and scaled at a time: at most 8 MB of float64, and at most
_BLOCK_SHARE = 64               # 1/64 of the r×r (each read makes two such temporaries: at C = 2,048, 8 MB blocks
#                                 were 0.45× the statistics beside the gathered result)


def _block_entries(r: int) -> int:
    return int(min(_BLOCK_ENTRIES, max(1 << 14, r * r // _BLOCK_SHARE)))


class ScaledGram:
    """``M = F G[rows][:, rows] F`` with ``M_jj = 1``, never stored (see the module docstring).

    Parameters
    ----------
    G : array (n, n)
        The statistics' Gram (read only).
    rows : int array (r,)
        Row of ``G`` of each whitened column (distinct).
    f : array (r,)
        Scale of each whitened column.

    Supports ``M.shape``, ``M[key]`` for row slices, ``M[:, cols]``, ``M[np.ix_(a, b)]`` and other pairs of
    1-D keys (slices, integer or boolean arrays), ``M @ X``, ``M.copy()``, ``M.astype(dtype)`` and ``M.T``
    (``M`` itself: symmetric).
    """

    ndim = 2
    dtype = np.dtype(np.float64)

    def __init__(self, G: np.ndarray, rows: np.ndarray, f: np.ndarray):
        self.G = G
        self.rows = np.asarray(rows, dtype=np.int64)
        self.f = np.asarray(f, dtype=np.float64)
        r = self.rows.size
        self.shape = (r, r)
        # (the live channels are all of G in its order: slices of G, no gathers)
        self.plain = r == G.shape[0] and bool(np.array_equal(self.rows, np.arange(r)))

    @property
    def T(self) -> "ScaledGram":
        return self

    # ------------------------------------------------------------------ reads
    def _key(self, key) -> tuple[slice | np.ndarray, bool]:
        """One axis' key as a slice (step 1) or an int array of M's indices; ``True`` when it was a scalar."""
        r = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(r)
            if step == 1:
                return slice(start, max(start, stop)), False
            return np.arange(start, stop, step), False
        if isinstance(key, (int, np.integer)):
            return np.array([int(key) % r]), True
        a = np.asarray(key)
        if a.dtype == bool:
            return np.flatnonzero(a.reshape(-1)), False
        return a.reshape(-1).astype(np.int64) % r if a.size else a.reshape(-1).astype(np.int64), False

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key, slice(None))
        if len(key) != 2 or any(isinstance(k, np.ndarray) and k.ndim > 2 for k in key):
            return self.dense()[key]            # (a key this view does not handle: the dense matrix's answer)
        (ri, rs), (ci, cs) = self._key(key[0]), self._key(key[1])
        out = self._read(ri, ci, np.float64)
        if rs and cs:
            return out[0, 0]
        return out[0] if rs else out[:, 0] if cs else out

    def _size(self, idx: slice | np.ndarray) -> int:
        return idx.stop - idx.start if isinstance(idx, slice) else idx.size

    def _in_g(self, idx: slice | np.ndarray) -> slice | np.ndarray:
        return idx if self.plain else self.rows[idx]

    def _read(self, ri: slice | np.ndarray, ci: slice | np.ndarray, dtype) -> np.ndarray:
        nr, nc = self._size(ri), self._size(ci)
        out = np.empty((nr, nc), dtype=dtype)
        fr, fc = self.f[ri], self.f[ci]
        gc = self._in_g(ci)
        step = max(1, _block_entries(self.shape[0]) // max(nc, 1))
        for i in range(0, nr, step):
            blk_rows = (slice(ri.start + i, ri.start + min(i + step, nr)) if isinstance(ri, slice)
                        else ri[i:i + step])
            gr = self._in_g(blk_rows)
            if isinstance(gr, slice) or isinstance(gc, slice):
                blk = self.G[gr, gc]                  # (at most one gather: views where both are slices)
            else:
                blk = self.G[np.ix_(gr, gc)]
            # (f_i·f_j first, as the dense whitening: the entries are exactly symmetric)
            np.multiply(blk, fr[i:i + step, None] * fc[None, :], out=out[i:i + step])
        self._unit_diagonal(out, ri, ci)
        return out

    def _unit_diagonal(self, out: np.ndarray, ri: slice | np.ndarray, ci: slice | np.ndarray) -> None:
        r = self.shape[0]
        ra = np.arange(r)[ri] if isinstance(ri, slice) else ri
        ca = np.arange(r)[ci] if isinstance(ci, slice) else ci
        if np.unique(ca).size == ca.size:
            pos = np.full(r, -1)
            pos[ca] = np.arange(ca.size)
            hit = pos[ra]
            p = np.flatnonzero(hit >= 0)
            out[p, hit[p]] = 1.0
        else:                                         # (repeated columns: rare, compared in full)
            out[ra[:, None] == ca[None, :]] = 1.0

    # ------------------------------------------------------------------ products and copies
    def __matmul__(self, X):
        """``M @ X`` for X (r,) or (r, m): ``F (G_PP (F X))`` plus the unit diagonal's rounding (no r×r copy)."""
        X = np.asarray(X, dtype=np.float64)
        V = X[:, None] if X.ndim == 1 else X
        Y = self.f[:, None] * V
        if self.plain:
            out = self.G @ Y
        else:
            out = np.empty_like(Y)
            step = max(1, _block_entries(self.shape[0]) // max(self.shape[0], 1))
            for i in range(0, self.shape[0], step):
                out[i:i + step] = self.G[np.ix_(self.rows[i:i + step], self.rows)] @ Y
        out *= self.f[:, None]
        # (the dense matrix's diagonal is exactly 1, this one's f_j²·G_jj: the difference, O(ε)·X; computed in Y's
        # memory, no longer needed)
        out += np.multiply((1.0 - self.f * self.f * self.G[self.rows, self.rows])[:, None], V, out=Y)
        return out[:, 0] if X.ndim == 1 else out

    def product(self, rows: slice | np.ndarray, cols: slice | np.ndarray, X: np.ndarray) -> np.ndarray:
        """``M[rows][:, cols] @ X`` (X: len(cols) × m), gathered a block of rows at a time (each block at most
        :func:`_block_entries` entries): never the whole len(rows)×len(cols) submatrix beside the statistics."""
        ri, ci = self._key(rows)[0], self._key(cols)[0]
        nr, nc = self._size(ri), self._size(ci)
        out = np.empty((nr, X.shape[1]))
        step = max(1, _block_entries(self.shape[0]) // max(nc, 1))
        for i in range(0, nr, step):
            blk = slice(ri.start + i, ri.start + min(i + step, nr)) if isinstance(ri, slice) else ri[i:i + step]
            np.matmul(self._read(blk, ci, np.float64), X, out=out[i:i + step])
        return out

    def dense(self, dtype=np.float64) -> np.ndarray:
        """The r×r matrix, built in one pass over ``G`` (C-ordered, in ``dtype``)."""
        return self._read(slice(0, self.shape[0]), slice(0, self.shape[0]), dtype)

    def copy(self) -> np.ndarray:
        return self.dense()

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self.dense(dtype)

    def __array__(self, dtype=None, copy=None):
        return self.dense(np.float64 if dtype is None else dtype)


def gathered_product(M, rows: slice | np.ndarray, cols: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``M[rows][:, cols] @ X`` for an array ``M`` (one gather, as the expression) or a :class:`ScaledGram` (row
    blocks: :meth:`ScaledGram.product`). ``rows``: ``slice(None)`` or an index array; ``cols``: an index array
    (integer or boolean)."""
    if isinstance(M, np.ndarray):
        return (M[:, cols] if isinstance(rows, slice) and rows == slice(None) else M[np.ix_(rows, cols)]) @ X
    return M.product(rows, cols, X)
