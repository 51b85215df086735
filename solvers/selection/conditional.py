"""Node-conditional perspective shifts for the branch and bound of ``method="exact"``.

The perspective bound of :mod:`solvers.selection.exact` needs a shift ``D`` with ``M − D ⪰ 0`` over
*all* whitened columns, so it is capped by the smallest eigenvalues of ``M`` (near-collinear
channels anywhere cap every channel's shift). At a branch-and-bound node with channels ``F`` fixed
in and ``O`` fixed out, only the sets ``S`` with ``F ⊆ S ⊆ F ∪ N`` (``N`` free) matter, and for them

    err(S)·‖Y‖² = min_W ‖Y‖² − 2⟨W, B⟩ + ⟨W, (M_TT − D_T) W⟩ + Σ_{g∈N} tr(W_gᵀ D_g W_g)/z_g

holds for any block-diagonal ``D_T = blkdiag(0_F, D_N)`` with ``M_TT − D_T ⪰ 0`` on ``T = F ∪ N``:
fixed-in channels need no perspective term (``z_g = 1``) and fixed-out columns drop out of the
inequality altogether. The condition is ``Schur_N(M_TT) ⪰ D_N`` — the Schur complement of ``M_FF``,
which is *weaker* than the root's ``M − D ⪰ 0`` (the root ``D_N`` always satisfies it), and much
weaker once the fixed-out channels took the worst collinearities with them.

:func:`node_shift` keeps the given (root or parent) shift on the free columns and scales it up by the
largest factor ``1 + δ`` it can certify: ``δ ≈ λ_min`` of the Schur complement of
``M_TT − blkdiag(0, D_N)``, measured in the metric of ``D_N`` (Lanczos on its inverse, through the
trailing block of one ordered Cholesky factor), then verified by a Cholesky factorization of
``M_TT − blkdiag(0_F, (1 + δ)·D_N)`` (backing off on failure). Any verified ``δ >= 0`` gives a
valid bound: the estimate only decides how tight it is. Shifts valid at a node stay valid in its
descendants (zeroing a newly fixed channel's shift or dropping its columns keeps the matrix PSD), so
the branch and bound passes them down and they grow with depth.

Measured on bench_exact's C = 64 3×3 layer: fixing 25 + 25 of 64 channels along the optimal path
leaves a node gap of 12.6 % with the root shift and 7.1 % with the conditional one; the branch and
bound needs 61 nodes instead of 153 (C = 128: optimal in 240 s instead of a 5.3 % gap).
"""
from __future__ import annotations

import numpy as np

from solvers.selection.panel_cholesky import LapackCholesky, factor_principal

# Smallest eigenvalue kept in the verified matrix (whitened units), as exact.Q_MARGIN.
MARGIN = 1e-9
# Fraction of the estimated λ_min tried first, then the back-off factor per failed verification.
FIRST_TRY = 0.95
BACKOFF = 0.5
POWER_STEPS = 30
# Verifications (factorizations) tried before settling for δ = 0.
MAX_TRIES = 4


def _lambda_min_trailing(factor, direction: np.ndarray, rng: np.random.Generator) -> float:
    """Estimate ``λ_min(D^{-1/2} S D^{-1/2})`` (from above) for ``S = Lnn Lnnᵀ`` given by its Cholesky ``factor``
    (:mod:`solvers.selection.panel_cholesky`) and ``D = diag(direction)``: Lanczos on the inverse, two triangular
    solves per step.

    (Plain inverse power iteration converges too slowly on these clustered spectra: its estimate
    overshoots and every failed verification costs a factorization.)
    """
    import scipy.sparse.linalg

    n = factor.r
    s = np.sqrt(direction)

    if n <= 64:
        if isinstance(factor, LapackCholesky):
            Ls = factor.L / s[:, None]
            return float(max(np.linalg.eigvalsh(Ls @ Ls.T)[0], 0.0))
        inv = s[:, None] * factor.solve(np.diag(s))           # D^{1/2} S⁻¹ D^{1/2}
        rho = float(np.linalg.eigvalsh((inv + inv.T) / 2.0)[-1])
        return 1.0 / rho if rho > 0 else 0.0
    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=lambda v: s * factor.solve(s * v.reshape(-1)),
                                            dtype=np.float64)
    try:
        rho = float(scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=1e-4, maxiter=20 * POWER_STEPS,
                                              v0=rng.normal(size=n), return_eigenvectors=False)[0])
    except scipy.sparse.linalg.ArpackNoConvergence as exc:
        rho = float(np.max(exc.eigenvalues)) if len(exc.eigenvalues) else 0.0
    return 1.0 / rho if rho > 0 else 0.0


def node_shift(M: np.ndarray, col_group: np.ndarray, tc_root: np.ndarray, fixed_in: np.ndarray,
               fixed_out: np.ndarray, *, seed: int = 0, proportional: bool = True,
               panel_min: int | None = None) -> tuple[np.ndarray, float] | None:
    """Per-column shifts (r,) valid at the node ``(fixed_in, fixed_out)``, and the extra ``δ`` added.

    Columns of fixed-in and fixed-out channels get 0, free columns ``tc_root + δ`` with
    ``M_TT − diag(0_F, tc_root_N + δ) − MARGIN·I ⪰ 0`` checked by Cholesky. ``tc_root`` must itself
    be feasible at the root (``M − diag(tc_root) ⪰ 0``), so ``δ = 0`` always is. Returns None when
    there is nothing free or no factorization succeeds (the caller keeps the root relaxation).
    Past ``panel_min`` columns of ``T`` (default: ``panel_threshold(M)``) the factorizations are
    :class:`PanelCholesky` panels (half a |T|×|T|).
    """
    F = fixed_in[col_group]
    N = ~(fixed_in | fixed_out)[col_group]
    idxF, idxN = np.flatnonzero(F), np.flatnonzero(N)
    if idxN.size == 0:
        return None
    idx = np.r_[idxF, idxN]
    nF = idxF.size
    tN = tc_root[idxN]

    def factor(extra: np.ndarray | float, split: int | None = None):
        # (M_TT − diag(0_F, tc_root_N) − extra, gathered afresh for every factorization: no |T|×|T| kept between them)
        return factor_principal(M, idx, -(np.r_[np.zeros(nF), tN] + extra), panel_min=panel_min, split=split)

    try:
        Lf = factor(MARGIN, split=nF)
    except np.linalg.LinAlgError:
        return None
    # direction of the increase: the root shift itself (keeps its shape across channels) or uniform
    direction = tN if proportional and np.all(tN > 0) else np.ones(idxN.size)
    # λ_min(Schur in the metric of diag(direction)) = max δ; the Schur complement's factor is Lf's trailing block
    tail = Lf.trailing(nF)
    del Lf                                   # (the leading block is not needed: only the trailing factor is kept)
    est = _lambda_min_trailing(tail, direction, np.random.default_rng(seed))
    del tail
    delta = FIRST_TRY * est
    tries = 0
    while delta * direction.max() > MARGIN and tries < MAX_TRIES:
        tries += 1
        try:
            factor(np.r_[np.zeros(nF), delta * direction] + MARGIN)
            break
        except np.linalg.LinAlgError:
            delta *= BACKOFF
    else:
        delta = 0.0
    tc = np.zeros_like(tc_root)
    tc[idxN] = tN + delta * direction
    return tc, delta


__all__ = ["node_shift"]
