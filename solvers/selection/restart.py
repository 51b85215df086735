"""Root restarts of ``method="exact"``: the smaller selection problem left once the root fixed channels.

At the root of the branch and bound, reduced-cost fixing (:func:`solvers.selection.exact._fix_by_reduced_cost`)
typically settles a large share of the channels: on bench_exact's C = 256 3×3 layer (k = 128) the root's
minorant forces 73–79 channels in. Every set still worth searching then contains the fixed-in set ``F``
and avoids the fixed-out set ``O``, and for those sets

    err(F ∪ S)·‖Y‖² = ‖Y_⊥‖² − tr(B'_Sᵀ (M'_SS)⁻¹ B'_S),   S ⊆ N (the free channels),

with ``M' = M_NN − M_NF M_FF⁻¹ M_FN`` (the Schur complement: the free columns with ``F``'s span projected
out), ``B' = B_N − M_NF M_FF⁻¹ B_F`` and ``‖Y_⊥‖² = ‖Y‖² − tr(B_Fᵀ M_FF⁻¹ B_F)``. That is a selection problem
of its own, with ``k − |F|`` channels to choose. Solving it afresh ("restarting", as MIP solvers restart
after root presolve) pays twice: every factorization of the tree is smaller (183 of 256 channels left:
(1,647/2,304)³ ≈ 0.37 of the work), and the perspective shifts are re-optimized for ``M'`` — whose
collinearities with ``F`` are gone — instead of being inherited from ``M`` and only scaled up
(:mod:`solvers.selection.conditional`). Measured on that layer, one process with two BLAS threads, 300 s:
the root bound rose from 3.42 % to 2.94 % below the incumbent, and the final gap fell from 1.94 % to 1.57 %
(with two worker processes: from 1.41 % to 0.55 %).

Below 3,000 whitened columns the second shift search costs more than it buys (C = 128 3×3: 31–34 s; at C = 256
its 40 s of tree time were worth more than its stronger root), so there a restart keeps the root's shift blocks
instead (``exact._inherited_shift``; C = 256 is then proven optimal in 215 s with two workers): for any
block-diagonal ``D`` with ``M − D ⪰ 0``, minimizing ``xᵀ(M − D)x`` over the fixed-in part of ``x`` gives
``M' ⪰ D_N``, so the parent's blocks of the free channels are a valid shift of the reduced problem.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from solvers.selection.greedy import Whitened
from solvers.selection.linalg import subtract_product, symmetrize_in_place
from solvers.selection.problem import SelectionProblem, solve_psd


@dataclass
class ReducedProblem:
    """The free channels' problem after fixings; energies are those of the original problem.

    Attributes
    ----------
    problem : SelectionProblem
        Over the free channels, in their original order (``free[i]`` is channel ``i`` of this problem).
    free : int array (C',)
        Original indices of the free channels.
    fixed_in : bool array (C,)
        Channels every searched set keeps.

    A set ``S`` of ``problem`` has the energy ``problem.target_sq · err'(S) = err(lift(S))·‖Y‖²``.
    """

    problem: SelectionProblem
    free: np.ndarray
    fixed_in: np.ndarray

    def lift(self, mask: np.ndarray) -> np.ndarray:
        """A set of the reduced problem (C',) as a set of the original one (C,)."""
        full = self.fixed_in.copy()
        full[self.free[np.asarray(mask, bool)]] = True
        return full


def reduce_problem(w: Whitened, costs: np.ndarray, fixed_in: np.ndarray, fixed_out: np.ndarray,
                   ) -> ReducedProblem | None:
    """The selection problem over the free channels of ``w`` given the fixings.

    None when nothing is free, or when the fixed-in channels already explain (round-off aside) all of
    ``‖Y‖²``: every set containing them is then optimal up to round-off.

    Free channels without whitened columns (dead: they explain nothing) are left out as well: dropping
    them from any set changes neither its error nor makes it infeasible (costs are >= 0).
    """
    C = w.n_channels
    sizes = np.diff(w.starts)
    free = np.flatnonzero(~(fixed_in | fixed_out) & (sizes > 0))
    if free.size == 0:
        return None
    F = fixed_in[w.col_group]
    N = np.isin(w.col_group, free)
    M_NN = w.M[np.ix_(N, N)]
    B_N = w.B[N]
    c = float(w.target_sq)
    if F.any():
        projected = _project_out_cholesky(w, F, N, M_NN, B_N)
        if projected is None:
            # (M_FF too close to singular for its factor: one checked solve of M_FF against [M_FN, B_F], the
            # projections of the free columns and of Y onto span(F))
            X = solve_psd(w.M[np.ix_(F, F)], np.concatenate([w.M[np.ix_(F, N)], w.B[F]], axis=1))
            n = int(N.sum())
            M_NF = w.M[np.ix_(N, F)]
            B_N = B_N - M_NF @ X[:, n:]
            c -= float(np.sum(w.B[F] * X[:, n:]))
            subtract_product(M_NN, M_NF, X[:, :n])  # (M_NN −= M_NF X_N in place: no n×n product beside it)
            del M_NF, X
        else:
            B_N, explained = projected
            c -= explained
        symmetrize_in_place(M_NN)
    if not c > 1e-12 * w.target_sq:
        return None
    remap = np.full(C, -1, np.int64)
    remap[free] = np.arange(free.size)
    problem = SelectionProblem(M_NN, B_N, c, remap[w.col_group[N]], costs=costs[free])
    return ReducedProblem(problem=problem, free=free, fixed_in=fixed_in.copy())


def _project_out_cholesky(w: Whitened, F: np.ndarray, N: np.ndarray, M_NN: np.ndarray, B_N: np.ndarray):
    """``M_NN −= Zᵀ Z`` in place with ``Z = L⁻¹ M_FN`` (``M_FF = L Lᵀ``), and ``(B_N − Zᵀ L⁻¹ B_F, ‖L⁻¹ B_F‖²)``: the
    Schur complement and the projections with one |F|×|N| beside ``M_NN`` (``Z`` overwrites the gathered ``M_FN``;
    ``B_N``, the caller's own array, is updated in place).
    None when ``M_FF`` has no factor or a pivot below 1e-10 of its diagonal (the caller's checked solve then)."""
    MFF = w.M[np.ix_(F, F)]
    diag = np.diag(MFF).copy()
    try:
        L = scipy.linalg.cholesky(MFF.T, lower=True, overwrite_a=True, check_finite=False)   # (symmetric: in place)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.diag(L) ** 2 > 1e-10 * np.maximum(diag, 1e-300)):
        return None
    Z = w.M[np.ix_(N, F)].T                      # (M_FN in LAPACK's order: the triangular solve overwrites it)
    Z = scipy.linalg.solve_triangular(L, Z, lower=True, overwrite_b=True, check_finite=False)
    zb = scipy.linalg.solve_triangular(L, w.B[F], lower=True, check_finite=False)
    del L, MFF                                   # (|F|×|F|: not kept beside the update)
    if not (np.all(np.isfinite(Z)) and np.all(np.isfinite(zb))):
        return None
    subtract_product(M_NN, Z.T, Z)               # (M_NN −= Zᵀ Z on its own memory; Z, F-ordered, is not copied)
    B_N -= Z.T @ zb                              # (the caller's fresh gather, updated in place: one |N|×m less)
    return B_N, float(np.sum(zb * zb))


__all__ = ["ReducedProblem", "reduce_problem"]
