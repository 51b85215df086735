"""The whitened Gram of a multi-column group, read from the statistics on access instead of copied.

With several columns per channel (a 3×3 conv's 9 per input channel), whitening is a block-diagonal
transform: ``M = Tᵀ G_PP T`` with ``T = blkdiag(T_g)`` (``T_g``: channel ``g``'s q_g original columns to its r_g
orthonormal directions, :func:`solvers.selection.greedy.whiten`) and identity diagonal blocks. At C = 512 3×3
the copy is 0.95× the statistics; forward selection reads one channel's columns per step and swap search the
kept set's rows, so neither needs all of it. :class:`BlockGram` is that matrix without its r×r copy: a read
gathers the rows and columns of ``G`` of the channels it touches (padded to the widest channel), applies the
column blocks, then the row blocks (the dense whitening's order), and writes the identity diagonal blocks; a
product ``M @ X`` is ``Tᵀ (G (T X))`` plus the diagonal blocks' round-off.

Reads equal the dense whitening up to round-off (the same sums, in other BLAS kernels); the diagonal blocks are
exactly the identity and ``dense()`` is made exactly symmetric, as the dense whitening's are.
"""
from __future__ import annotations

import numpy as np

from solvers.selection.linalg import symmetrize_in_place
from solvers.selection.scaled_gram import ScaledGram, _block_entries

__all__ = ["BlockGram"]


class BlockGram(ScaledGram):
    """``M = Tᵀ G_PP T`` (identity diagonal blocks), never stored (see the module docstring).

    Parameters
    ----------
    G : array (n, n)
        The statistics' Gram (read only).
    cols : list of C int arrays
        Original columns of each channel (``q_g`` each; every column of ``G`` in exactly one channel).
    T : list of C arrays (q_g, r_g)
        Each channel's whitening transform (``T_gᵀ G_gg T_g = I`` up to round-off; r_g = 0 for a dead channel).

    Reads and products as :class:`~solvers.selection.scaled_gram.ScaledGram` (row slices, ``M[:, cols]``,
    ``M[np.ix_(a, b)]``, ``M @ X``, ``product``, ``dense``, ``copy``, ``astype``, ``M.T``).
    """

    def __init__(self, G: np.ndarray, cols: list[np.ndarray], T: list[np.ndarray]):
        self.G = G
        C = len(cols)
        q = np.array([c.size for c in cols], dtype=np.int64)
        rg = np.array([t.shape[1] for t in T], dtype=np.int64)
        self.qmax, self.rmax = max(int(q.max(initial=0)), 1), max(int(rg.max(initial=0)), 1)
        self.starts = np.concatenate([[0], np.cumsum(rg)]).astype(np.int64)
        r = int(self.starts[-1])
        self.shape = (r, r)
        self.col_group = np.repeat(np.arange(C), rg)
        self.local = np.arange(r) - self.starts[self.col_group]
        # (padded to the widest channel: pad columns read G's column 0, and their zero rows of T drop it again)
        self.orig = np.zeros((C, self.qmax), dtype=np.int64)
        self.Tp = np.zeros((C, self.qmax, self.rmax))
        self.real = np.zeros((C, self.qmax), dtype=bool)
        for g in range(C):
            self.orig[g, :q[g]] = cols[g]
            self.real[g, :q[g]] = True
            self.Tp[g, :q[g], :rg[g]] = T[g]
        self._unit_defect()

    def _unit_defect(self) -> None:
        """``I − T_gᵀ G_gg T_g``: what the identity diagonal blocks differ by from the transform's (C × r_max²)."""
        Ggg = self.G[self.orig[:, :, None], self.orig[:, None, :]]
        self.unit_defect = np.eye(self.rmax)[None] - np.swapaxes(self.Tp, 1, 2) @ Ggg @ self.Tp

    def rotated(self, U: list[np.ndarray]) -> "BlockGram":
        """The same Gram with channel ``g``'s whitened columns rotated by the orthogonal ``U[g]`` (r_g × r_g): the
        transforms become ``T_g U_g``, still read from the statistics (``perspective.rotate`` of a lazy problem)."""
        out = object.__new__(BlockGram)
        out.__dict__.update(self.__dict__)
        out.Tp = self.Tp.copy()
        for g, u in enumerate(U):
            rg = int(self.starts[g + 1] - self.starts[g])
            if rg:
                out.Tp[g, :, :rg] = self.Tp[g, :, :rg] @ u
        out._unit_defect()
        return out

    # ------------------------------------------------------------------ reads
    def _indices(self, idx: slice | np.ndarray) -> np.ndarray:
        return np.arange(idx.start, idx.stop) if isinstance(idx, slice) else idx

    def _read(self, ri: slice | np.ndarray, ci: slice | np.ndarray, dtype) -> np.ndarray:
        ra, ca = self._indices(ri), self._indices(ci)
        out = np.empty((ra.size, ca.size), dtype=dtype)
        if out.size == 0:
            return out
        q, rm = self.qmax, self.rmax
        col_ch, col_inv = np.unique(self.col_group[ca], return_inverse=True)
        col_pos = col_inv * rm + self.local[ca]
        Tc = self.Tp[col_ch]                                        # (nc, q, r_max)
        gcols = self.orig[col_ch].reshape(-1)
        row_ch, row_inv = np.unique(self.col_group[ra], return_inverse=True)
        # (each block: its channels' rows of G against all the columns' channels, at most _block_entries entries)
        step = max(1, _block_entries(self.shape[0]) // max(q * gcols.size, 1))
        for lo in range(0, row_ch.size, step):
            chans = row_ch[lo:lo + step]
            nr, nc = chans.size, col_ch.size
            Gb = self.G[np.ix_(self.orig[chans].reshape(-1), gcols)]            # (nr·q, nc·q)
            # columns first, as the dense whitening: (nc, nr·q, r_max)
            X = np.matmul(Gb.reshape(nr * q, nc, q).transpose(1, 0, 2), Tc)
            del Gb
            X = X.reshape(nc, nr, q, rm).transpose(1, 2, 0, 3).reshape(nr, q, nc * rm)
            Z = np.matmul(np.swapaxes(self.Tp[chans], 1, 2), X)                   # (nr, r_max, nc·r_max)
            del X
            Z4 = Z.reshape(nr, rm, nc, rm)
            _, a, b = np.intersect1d(chans, col_ch, assume_unique=True, return_indices=True)
            if a.size:                                                            # identity diagonal blocks
                Z4[a[:, None, None], np.arange(rm)[None, :, None], b[:, None, None],
                   np.arange(rm)[None, None, :]] = np.eye(rm)[None]
            sel = np.flatnonzero((row_inv >= lo) & (row_inv < lo + nr))
            rows_pos = (row_inv[sel] - lo) * rm + self.local[ra[sel]]
            out[sel] = Z.reshape(nr * rm, nc * rm)[np.ix_(rows_pos, col_pos)]
        return out

    # ------------------------------------------------------------------ products and copies
    def __matmul__(self, X):
        """``M @ X`` for X (r,) or (r, m): ``Tᵀ (G (T X))`` plus the identity blocks' difference (no r×r copy)."""
        X = np.asarray(X, dtype=np.float64)
        V = X[:, None] if X.ndim == 1 else X
        C, m = self.orig.shape[0], V.shape[1]
        Xp = np.zeros((C, self.rmax, m))
        Xp[self.col_group, self.local] = V
        Y = self.Tp @ Xp                                                          # (C, q, m)
        Yo = np.zeros((self.G.shape[0], m))
        Yo[self.orig[self.real]] = Y[self.real]
        del Y
        Z = (self.G @ Yo)[self.orig]                                              # (C, q, m)
        del Yo
        out_p = np.swapaxes(self.Tp, 1, 2) @ Z
        out_p += self.unit_defect @ Xp
        out = out_p[self.col_group, self.local]
        return out[:, 0] if X.ndim == 1 else out

    def dense(self, dtype=np.float64) -> np.ndarray:
        """The r×r matrix (C-ordered, in ``dtype``), exactly symmetric (its transpose is the Fortran-ordered copy)."""
        A = self._read(slice(0, self.shape[0]), slice(0, self.shape[0]), dtype)
        symmetrize_in_place(A)
        return A
