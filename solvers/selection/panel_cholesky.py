"""A Cholesky factor kept as column panels of its lower triangle: half the memory of an r×r array.

LAPACK's ``potrf`` factors a full r×r array in place, so certifying ``M − T ⪰ 0`` at C = 11,008 costs one r×r
(0.97 GB, as much as the statistics) beside whatever else is alive. The factor itself is triangular: stored as
column panels ``P_j = L[jb:, jb:jb+b]`` (each only the rows from its diagonal block down) it needs ``r²/2 + r·b/2``
entries. The matrix is never held either: each panel's columns are read from the caller when the panel is
factored (left-looking blocked Cholesky, the same arithmetic as LAPACK's blocked algorithm):

    P_j = A[jb:, jb:jb+b] − Σ_{i<j} L_i[jb:] L_i[jb:jb+b]ᵀ,   L_jj = chol(P_j's top b×b),   below = below · L_jj⁻ᵀ

A non-positive pivot raises :class:`numpy.linalg.LinAlgError`, as ``scipy.linalg.cholesky`` does: that is the
certificate callers need (``M − T`` positive definite in floating point). The panels' GEMMs run at BLAS speed
(measured at r = 11,008 on the 2-core CPU: see ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dgemm, dtrsm

from solvers.selection.linalg import subtract_product

__all__ = ["PanelCholesky", "PANEL_WIDTH", "PANEL_MIN_COLUMNS", "PANEL_MIN_DENSE_COLUMNS", "LapackCholesky",
           "factor_principal", "panel_threshold", "solve_gathered"]

#: Columns per panel (the update GEMMs are (r − jb) × b × b: large enough for BLAS, small beside r²/2).
PANEL_WIDTH = 512
#: Past this many columns callers factor a Gram read lazily (where the statistics' memory is the point) in panels:
#: alone they run at LAPACK's speed including the gather LAPACK's path needs (2-core CPU, 2 threads: 1,024 columns
#: 14.8 against 14.2 ms, 2,048 74 against 81 ms). An array is factored in panels past PANEL_MIN_DENSE_COLUMNS
#: only: inside exact's branch and bound on C = 256 3×3 (gathered M_TT of 1,100–2,300 columns) the panels bounded
#: 82 nodes in 90 s against LAPACK's 131.
PANEL_MIN_COLUMNS = 1024
PANEL_MIN_DENSE_COLUMNS = 3000


def _panel_starts(r: int, width: int, split: int | None) -> list[int]:
    """First column of every panel: ``width`` at a time, and a panel boundary at ``split`` (see :meth:`trailing`)."""
    if split is None or split <= 0 or split >= r:
        return list(range(0, r, width))
    return list(range(0, split, width)) + list(range(split, r, width))


class PanelCholesky:
    """``A = L Lᵀ`` with ``L`` held as column panels (see the module docstring).

    Build with :meth:`factor`; :meth:`solve` solves ``A x = v``; :meth:`trailing` gives the factor of the Schur
    complement of a leading block (the trailing panels themselves, no copy).
    """

    def __init__(self, panels: list[np.ndarray], starts: list[int], r: int):
        self.panels, self.starts, self.r = panels, list(starts), r

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.panels))

    @classmethod
    def factor(cls, columns: Callable[[int, int], np.ndarray], r: int, *, width: int = PANEL_WIDTH,
               split: int | None = None) -> "PanelCholesky":
        """Factor the SPD r×r matrix whose rows ``lo:`` of columns ``lo:hi`` ``columns(lo, hi)`` returns (a fresh
        (r − lo) × (hi − lo) float64 array the factorization may overwrite; only its lower part is read).
        ``split``: a panel boundary there, so that :meth:`trailing` can hand out the factor of ``A[split:, split:]``'s
        Schur complement.

        Raises ``numpy.linalg.LinAlgError`` when a pivot is not positive (the matrix is not positive definite).
        """
        starts = _panel_starts(r, width, split)
        ends = starts[1:] + [r]
        panels: list[np.ndarray] = []
        for lo, hi in zip(starts, ends):
            b = hi - lo
            P = np.ascontiguousarray(columns(lo, hi), dtype=np.float64)
            if P.shape != (r - lo, b):
                raise ValueError(f"columns({lo}, {hi}) gave shape {P.shape}; expected {(r - lo, b)}")
            Pt = P.T                                  # (F-ordered view: the GEMMs update it in place)
            for Li, si in zip(panels, starts):
                off = lo - si                     # (panel i's rows start at its own diagonal block)
                # Pᵀ −= L_i[jb:jb+b] L_i[jb:]ᵀ (both operands F-ordered views of C-ordered rows: no copies)
                out = dgemm(-1.0, Li[off:off + b].T, Li[off:].T, beta=1.0, c=Pt, trans_a=1, overwrite_c=1)
                if not np.shares_memory(out, P):
                    Pt[...] = out
            D = P[:b]
            # (D is C-ordered: its transpose is in LAPACK's order, and the upper factor of Dᵀ is L_jjᵀ, written in
            # place; D's lower triangle is read, as of any symmetric block)
            U = scipy.linalg.cholesky(D.T, lower=False, overwrite_a=True, check_finite=False)
            if not np.shares_memory(U, D):
                D[...] = U.T
            D[np.triu_indices(b, 1)] = 0.0
            if r - hi:
                below = P[b:].T                       # (F-ordered view: L_jj X = belowᵀ solved in place)
                X = dtrsm(1.0, D.T, below, side=0, lower=0, trans_a=1, overwrite_b=1)
                if not np.shares_memory(X, below):
                    below[...] = X
            panels.append(P)
        return cls(panels, starts, r)

    def release_lower(self, dtype=np.float64) -> np.ndarray:
        """``L`` as one Fortran-ordered r×r array in ``dtype`` (upper triangle zero), each panel released once copied:
        the factor's memory and the array's never both whole (this factor is empty afterwards)."""
        L = np.zeros((self.r, self.r), dtype=dtype, order="F")
        while self.panels:
            P, lo = self.panels.pop(0), self.starts.pop(0)
            L[lo:, lo:lo + P.shape[1]] = P
            del P
        return L

    def trailing(self, split: int) -> "PanelCholesky":
        """The factor of ``A[split:, split:] − A[split:, :split] A[:split, :split]⁻¹ A[:split, split:]``: the panels
        from ``split`` on (``split`` must be a panel boundary: :meth:`factor`'s ``split``)."""
        if split == 0:
            return self
        if split not in self.starts:
            raise ValueError(f"{split} is not a panel boundary ({self.starts[:4]}…)")
        j = self.starts.index(split)
        return PanelCholesky(self.panels[j:], [s - split for s in self.starts[j:]], self.r - split)

    def solve(self, v: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """``A⁻¹ v`` for v (r,) or (r, m): forward then backward substitution through the panels (``overwrite``: in
        ``v``'s memory when it is a C-ordered float64 array)."""
        inplace = overwrite and v.dtype == np.float64 and v.flags.c_contiguous and v.flags.writeable
        y = v if inplace else np.array(v, dtype=np.float64, order="C")
        for lo, P in zip(self.starts, self.panels):            # L y = v
            b = P.shape[1]
            y[lo:lo + b] = scipy.linalg.solve_triangular(P[:b], y[lo:lo + b], lower=True, check_finite=False)
            if P.shape[0] > b:
                if y.ndim == 2:
                    # (y's trailing rows updated by BLAS in place: the product was a second (r − lo)×m beside y)
                    subtract_product(y[lo + b:], P[b:], y[lo:lo + b])
                else:
                    y[lo + b:] -= P[b:] @ y[lo:lo + b]
        for lo, P in zip(reversed(self.starts), reversed(self.panels)):   # Lᵀ x = y
            b = P.shape[1]
            if P.shape[0] > b:
                if y.ndim == 2:
                    subtract_product(y[lo:lo + b], P[b:].T, y[lo + b:])    # (in place, as the forward pass)
                else:
                    y[lo:lo + b] -= P[b:].T @ y[lo + b:]
            y[lo:lo + b] = scipy.linalg.solve_triangular(P[:b], y[lo:lo + b], lower=True, trans="T",
                                                          check_finite=False)
        return y


class LapackCholesky:
    """LAPACK's factor of a small matrix (``A = L Lᵀ`` with ``lower``, else ``A = Uᵀ U``), with :class:`PanelCholesky`'s
    ``solve`` and ``trailing``."""

    def __init__(self, factor: np.ndarray, lower: bool = True):
        self.factor, self.lower = factor, lower       # (the other triangle is ignored)
        self.r = factor.shape[0]

    @property
    def L(self) -> np.ndarray:
        """The lower factor (a transposed view of an upper one)."""
        return self.factor if self.lower else self.factor.T

    def trailing(self, split: int) -> "LapackCholesky":
        # (a contiguous copy, once: LAPACK's solves would copy the strided block on every call)
        return self if split == 0 else LapackCholesky(np.asfortranarray(self.factor[split:, split:]), self.lower)

    def solve(self, v: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """``A⁻¹ v`` (``overwrite``: in ``v``'s memory when LAPACK can use it, i.e. a Fortran-ordered float64 array)."""
        return scipy.linalg.cho_solve((self.factor, self.lower), v, overwrite_b=overwrite, check_finite=False)


def solve_gathered(factor: "PanelCholesky | LapackCholesky", B: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``A⁻¹ B[idx]`` (|idx|×m) solved in the gathered right-hand side's own memory: gathered in the order the
    factor's solve works in (Fortran for LAPACK, C for panels), so no solve copy sits beside it."""
    X = np.empty((idx.size, B.shape[1]), order="F" if isinstance(factor, LapackCholesky) else "C")
    np.take(B, idx, axis=0, out=X, mode="clip")        # ("clip": no buffered copy; the indices are in range)
    return factor.solve(X, overwrite=True)


def panel_threshold(M) -> int:
    """Columns past which :func:`factor_principal` factors principal submatrices of ``M`` in panels:
    ``PANEL_MIN_COLUMNS`` for a Gram read lazily (anything but an array), ``PANEL_MIN_DENSE_COLUMNS`` for an array."""
    return PANEL_MIN_DENSE_COLUMNS if isinstance(M, np.ndarray) else PANEL_MIN_COLUMNS


def _fresh(A) -> np.ndarray:
    """``A`` itself when it is a gather's own C-ordered float64 array (fancy indexing and a ScaledGram's reads make
    one), else a copy: an array the caller may overwrite without a second copy of a gathered one."""
    if isinstance(A, np.ndarray) and A.flags.owndata and A.flags.c_contiguous and A.dtype == np.float64:
        return A
    return np.array(A, dtype=np.float64)


def factor_principal(M, idx: np.ndarray | None, add: np.ndarray | float = 0.0, *, panel_min: int | None = None,
                     split: int | None = None, lower: bool = True) -> "PanelCholesky | LapackCholesky":
    """Cholesky factor of ``M[idx][:, idx] + diag(add)`` (``idx`` None: all of ``M``), gathered from ``M`` (an array or
    any view with ``M[np.ix_(a, b)]`` reads, e.g. a :class:`~solvers.selection.scaled_gram.ScaledGram`) and never
    written to it. Past ``panel_min`` columns (default :func:`panel_threshold`) a :class:`PanelCholesky` (half the
    memory, the matrix read panel by panel); else one gathered array factored in place by LAPACK.
    ``numpy.linalg.LinAlgError`` when it is not positive definite. ``split``: see :meth:`PanelCholesky.factor`;
    ``lower``: which triangle LAPACK's path factors (the same factor in exact arithmetic, different round-off)."""
    idx = np.arange(M.shape[0]) if idx is None else np.asarray(idx)
    r = idx.size
    panel_min = panel_threshold(M) if panel_min is None else panel_min
    d = np.broadcast_to(np.asarray(add, dtype=np.float64), (r,))
    if r > panel_min:
        def columns(lo: int, hi: int) -> np.ndarray:
            P = _fresh(M[np.ix_(idx[lo:], idx[lo:hi])])       # (the factorization overwrites it)
            P[np.arange(hi - lo), np.arange(hi - lo)] += d[lo:hi]
            return P
        return PanelCholesky.factor(columns, r, split=split)
    A = _fresh(M[np.ix_(idx, idx)])
    A[np.diag_indices_from(A)] += d
    # (A is symmetric: its transpose is in LAPACK's order and is factored in place; A itself would be copied first)
    return LapackCholesky(scipy.linalg.cholesky(A.T, lower=lower, overwrite_a=True, check_finite=False), lower)
