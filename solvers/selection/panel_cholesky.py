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

__all__ = ["PanelCholesky", "PANEL_WIDTH"]

#: Columns per panel (the update GEMMs are (r − jb) × b × b: large enough for BLAS, small beside r²/2).
PANEL_WIDTH = 512


class PanelCholesky:
    """``A = L Lᵀ`` with ``L`` held as column panels (see the module docstring).

    Build with :meth:`factor`; :meth:`solve` solves ``A x = v``.
    """

    def __init__(self, panels: list[np.ndarray], width: int, r: int):
        self.panels, self.width, self.r = panels, width, r

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.panels))

    @classmethod
    def factor(cls, columns: Callable[[int, int], np.ndarray], r: int, *, width: int = PANEL_WIDTH
               ) -> "PanelCholesky":
        """Factor the SPD r×r matrix whose rows ``lo:`` of columns ``lo:hi`` ``columns(lo, hi)`` returns (a fresh
        (r − lo) × (hi − lo) float64 array the factorization may overwrite; only its lower part is read).

        Raises ``numpy.linalg.LinAlgError`` when a pivot is not positive (the matrix is not positive definite).
        """
        panels: list[np.ndarray] = []
        for lo in range(0, r, width):
            hi = min(lo + width, r)
            b = hi - lo
            P = np.ascontiguousarray(columns(lo, hi), dtype=np.float64)
            if P.shape != (r - lo, b):
                raise ValueError(f"columns({lo}, {hi}) gave shape {P.shape}; expected {(r - lo, b)}")
            Pt = P.T                                  # (F-ordered view: the GEMMs update it in place)
            for i, Li in enumerate(panels):
                off = lo - i * width              # (panel i's rows start at its own diagonal block)
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
        return cls(panels, width, r)

    def solve(self, v: np.ndarray) -> np.ndarray:
        """``A⁻¹ v`` for v (r,) or (r, m): forward then backward substitution through the panels."""
        y = np.array(v, dtype=np.float64)
        w = self.width
        for j, P in enumerate(self.panels):                 # L y = v
            lo, b = j * w, P.shape[1]
            y[lo:lo + b] = scipy.linalg.solve_triangular(P[:b], y[lo:lo + b], lower=True, check_finite=False)
            if P.shape[0] > b:
                y[lo + b:] -= P[b:] @ y[lo:lo + b]
        for j in range(len(self.panels) - 1, -1, -1):      # Lᵀ x = y
            P = self.panels[j]
            lo, b = j * w, P.shape[1]
            rhs = y[lo:lo + b] - (P[b:].T @ y[lo + b:] if P.shape[0] > b else 0.0)
            y[lo:lo + b] = scipy.linalg.solve_triangular(P[:b], rhs, lower=True, trans="T", check_finite=False)
        return y
