"""Block-diagonal perspective shifts for ``method="exact"``: the "optimal perspective" of Dong, Chen &
Linderoth (2015) extended to channel groups, by a first-order method.

In whitened coordinates (``M_gg = I``) the perspective bound of :mod:`solvers.selection.exact` takes
any block-diagonal ``D = blkdiag(D_g)`` with ``D_g ≻ 0`` and ``M − D ⪰ 0``:

    err(S)·‖Y‖² = F_D(z) = min_W ‖Y‖² − 2⟨W, B⟩ + ⟨W, (M − D) W⟩ + Σ_g tr(W_gᵀ D_g W_g) / z_g .

The relaxation's value ``φ(D) = min_{z ∈ conv} F_D(z)`` is concave in ``D`` (a minimum of functions
concave in ``D``), and by Danskin's theorem its supergradient in block ``g`` is
``∂F/∂D_g = (1/z_g − 1) W_g W_gᵀ`` at the relaxed optimum ``(z, W)``. :func:`optimize_shift` runs
supergradient ascent (AdaGrad-scaled per block) on ``φ`` with a log-det barrier ``μ (log det(M − D) + Σ log det D_g)``
keeping ``D`` strictly inside the feasible set (Cholesky-checked step lengths), ``μ → 0``, the inner
``min_z`` by warm-started Frank–Wolfe steps (:func:`solvers.selection.exact._relax`). Maximizing ``φ``
exactly is an SDP (one r×r matrix inequality plus C blocks); this is its first-order counterpart.
When the ascent stalls (``patience`` steps without a new best) it restarts from its best blocks with
fresh step sizes, a few times, then stops; when its first steps gain nothing it stops at once.

How far this is from the SDP optimum was measured only where an interior-point solver holds the SDP
(cvxpy + Clarabel, bench_exact --study --sdp-solver CLARABEL: C = 12 3×3, m = 8, n/d = 2.2): root bound /
optimum 0.996 for the SDP against 0.96 for this ascent (the SDP restricted to per-column shifts in the
eigenbasis of the ascent's blocks: 0.986), and more steps, restarts, other step sizes or starts below the
scalar shifts plateau at 0.96–0.97; so a second-order solver for the shift magnitudes is the next lever.
SCS does not converge on the SDP (values outside [0, optimum] at C = 32) and larger layers exceed
Clarabel's dense KKT system. Separately, the sample count caps every shift on bench_exact's large layers:
with n samples of d columns λ_min(M) falls as n/d shrinks (root bound / optimum with scalar shifts,
n/d ≈ 2.2: 0.68 at C = 64, 0.62 at C = 128, 0.60 at C = 256; n/d ≈ 8.7: 0.87 at C = 64, 0.91 at C = 256).

:func:`saddle_sizes` (session 5) closes most of that gap for the *sizes*: in a fixed basis per channel
(``D_g = U_g diag(d_g) U_gᵀ``) it solves the saddle problem ``max_d min_z F_d(z)`` by a primal-dual
interior-point Newton method (O(r³) per iteration, about 30 iterations), and every iterate's weights give
a valid bound. ``exact``'s ``shift="block"`` runs it in the eigenbasis of ``(M⁻¹)_gg``
(:func:`inverse_basis`), then the ascent above from its blocks (directions), then the sizes once more.

The relaxation machinery works with a *diagonal* shift, so every block is written in its own
eigenbasis: ``D_g = U_g diag(d_g) U_gᵀ`` and the channel's whitened columns are rotated by ``U_g``
(:func:`rotate`; ``M_gg = I`` and every refit error are unchanged). Any feasible ``D`` gives a valid
bound, so the optimizer only has to keep ``D`` feasible; how far it climbs decides how tight it is.
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.linalg

from solvers.selection.block_gram import BlockGram
from solvers.selection.greedy import Whitened
from solvers.selection.linalg import subtract_product, symmetrize_in_place
from solvers.selection.panel_cholesky import factor_principal
from solvers.selection.scaled_gram import ScaledGram

# Smallest eigenvalue kept in M − D and in each D_g (whitened units), as in exact.Q_MARGIN.
MARGIN = 1e-9
# Stall handling of optimize_shift (measured on bench_exact's conv layers, see its docstring).
PATIENCE = 15
RESTARTS = 3
RESTART_MU = 0.1
FIRST_PATIENCE = 12


def rotate(w: Whitened, U: list[np.ndarray]) -> Whitened:
    """The same problem with channel ``g``'s whitened columns rotated by the orthogonal ``U[g]``.

    ``w`` itself when every ``U[g]`` is the identity (one-column channels always: a lazy ``M`` stays lazy)."""
    if all(np.array_equal(u, np.eye(u.shape[0])) for u in U):
        return w
    B = w.B.copy()
    for g in range(w.n_channels):
        sl = w.cols(g)
        if sl.stop > sl.start:
            B[sl] = U[g].T @ B[sl]
    if isinstance(w.M, BlockGram):          # (read from the statistics: the rotation joins the whitening transforms)
        return Whitened(M=w.M.rotated(U), B=B, target_sq=w.target_sq, col_group=w.col_group, starts=w.starts)
    M = w.M.copy()
    for g in range(w.n_channels):
        sl = w.cols(g)
        if sl.stop > sl.start:
            M[:, sl] = M[:, sl] @ U[g]
    for g in range(w.n_channels):
        sl = w.cols(g)
        if sl.stop > sl.start:
            M[sl, :] = U[g].T @ M[sl, :]
    symmetrize_in_place(M)
    for g in range(w.n_channels):
        sl = w.cols(g)
        M[sl, sl] = np.eye(sl.stop - sl.start)
    return Whitened(M=M, B=B, target_sq=w.target_sq, col_group=w.col_group, starts=w.starts)


def fortran_copy(M, dtype=np.float64) -> np.ndarray:
    """A Fortran-ordered copy of the symmetric ``M`` in ``dtype`` (an array, or a Gram read lazily: its dense build's
    transpose, no second copy), for LAPACK to factor or invert in place."""
    if isinstance(M, ScaledGram):
        return M.dense(dtype).T
    return np.array(M, dtype=dtype, order="F")


def _minus_blocks(w: Whitened, D: list[np.ndarray]) -> np.ndarray:
    """``M − blkdiag(D)`` in one Fortran-ordered copy of ``M``, for LAPACK to factor or invert in place (the expression
    with a dense ``blkdiag(D)`` held three r×r: 4.8× the statistics in the feasibility check at C = 512 3×3)."""
    A = fortran_copy(w.M)
    for g, Dg in enumerate(D):
        sl = w.cols(g)
        if sl.stop > sl.start:
            A[sl, sl] -= Dg
    return A


def _inverse_minus_blocks(w: Whitened, D: list[np.ndarray]) -> np.ndarray:
    """``(M − blkdiag(D))⁻¹``: from ``SINGLE_MIN_COLUMNS`` columns on by Cholesky in the one copy (``D`` is feasible:
    ``M − D ⪰ MARGIN·I``), where numpy's LU inverse held three r×r beside it (3.2× the statistics at C = 512 3×3);
    smaller problems keep the LU inverse's arithmetic."""
    A = _minus_blocks(w, D)
    if A.shape[0] >= SINGLE_MIN_COLUMNS:
        X = _inv_spd(A, overwrite=True)
        if X is not None:
            return X
        A = _minus_blocks(w, D)
    return np.linalg.inv(A)


def _feasible(w: Whitened, D: list[np.ndarray]) -> bool:
    for g, Dg in enumerate(D):
        if Dg.size and np.linalg.eigvalsh(Dg)[0] < MARGIN:
            return False
    A = _minus_blocks(w, D)
    A[np.diag_indices_from(A)] -= MARGIN
    return _factors(A) is not None


def eig_blocks(D: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Eigenbases ``U[g]`` and the per-column eigenvalues (concatenated in column order)."""
    U, d = [], []
    for Dg in D:
        if Dg.size == 0:
            U.append(np.zeros((0, 0)))
            continue
        lam, V = np.linalg.eigh(0.5 * (Dg + Dg.T))
        U.append(V)
        d.append(lam)
    return U, (np.concatenate(d) if d else np.zeros(0))


# Defaults measured on bench_exact's C = 64 3×3 layer (root gap 13.0 % with the scalar shifts, 30 steps of
# 5 Frank–Wolfe steps): barrier weight 1e-4·‖Y‖² decaying ×0.9 per step, AdaGrad-scaled block steps of
# 0.3/√t of the largest entry: 7.9 % (1e-3: 10.8 %; 1e-5: 9.6 %; without the per-block scaling 10.2 %;
# without a barrier 13.0 %: the ascent sticks to the boundary of M − D ⪰ 0).
def optimize_shift(w: Whitened, t0: np.ndarray, relax_value, *, iterations: int = 60,
                   deadline: float | None = None, mu0: float = 1e-4, step0: float = 0.3,
                   adaptive: bool = False, mu_decay: float = 0.9,
                   precondition: bool = True, patience: int | None = PATIENCE,
                   restarts: int = RESTARTS, first_patience: int | None = FIRST_PATIENCE,
                   D_init: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], dict]:
    """Block shifts ``D_g`` climbing the relaxation value from the scalar shifts ``t0`` (C,).

    ``relax_value(w_rot, d_cols, z)`` must return ``(bound, z, W)``: a valid relaxation bound (energy)
    for the rotated problem with per-column shifts, the relaxed point and the relaxed weights
    (rotated coordinates) at it. Returns the best blocks found (in ``w``'s basis) and a trace.

    ``patience``: after that many steps without a new best value the ascent restarts from the best
    blocks (fresh AdaGrad scaling, barrier ``RESTART_MU``·``mu0``), at most ``restarts`` times, then
    stops; ``first_patience``: it stops at once when the first that many steps never beat the
    starting value (the ascent is not going to help: its time goes back to the caller).
    ``D_init`` starts from these blocks (feasible: ``M − D ⪰ 0``) instead of ``t0``.
    """
    C = w.n_channels
    sizes = np.diff(w.starts)
    D = ([t0[g] * np.eye(int(sizes[g])) for g in range(C)] if D_init is None
         else [np.array(x, dtype=np.float64, copy=True) for x in D_init])
    best_D, best_val = [x.copy() for x in D], -math.inf
    z = None
    trace = []
    acc: list[float] = []
    step = step0
    mu = mu0
    since_best = 0          # steps since the last new best value
    local = 0               # steps since the (re)start, for the step schedule
    restarts_done = 0
    for it in range(iterations):
        if deadline is not None and time.perf_counter() > deadline:
            break
        U, d = eig_blocks(D)
        # (the rotated copy lives only through the relaxation: the next step's rotation would make a second one)
        val, z, W = relax_value(rotate(w, U), d, z)
        trace.append(val)
        if val > best_val:
            best_val, best_D = val, [x.copy() for x in D]
            since_best = 0
            if adaptive:
                step *= 1.3
        else:
            since_best += 1
            if adaptive:
                step *= 0.5
        if first_patience is not None and it + 1 >= first_patience and max(trace) <= trace[0]:
            break               # no gain at all from the start: give the time back
        if patience is not None and since_best >= patience:
            if restarts_done >= restarts:
                break
            # restart from the best blocks: the AdaGrad sums and the step schedule had shrunk the
            # steps below what the remaining ascent needs (bench_exact C = 64 3×3, root bound /
            # optimum after 120 steps: 0.927 without restarts, 0.928 with; 4 × 60 steps: 0.931)
            restarts_done += 1
            D = [x.copy() for x in best_D]
            acc, local, since_best = [], 0, 0
            mu = RESTART_MU * mu0
            continue
        if not adaptive:
            step = step0 / math.sqrt(local + 1)
        local += 1
        # supergradient of the relaxation value (original whitened basis), in units of ‖Y‖²
        Xi = _inverse_minus_blocks(w, D)
        grad = []
        for g in range(C):
            sl = w.cols(g)
            q = sl.stop - sl.start
            if q == 0:
                grad.append(np.zeros((0, 0)))
                continue
            zg = float(z[g])
            Gg = np.zeros((q, q))
            if 0.0 < zg < 1.0:
                Wg = U[g] @ W[sl]
                Gg = (1.0 / zg - 1.0) * (Wg @ Wg.T) / w.target_sq
            Gg += mu * (np.linalg.inv(D[g]) - Xi[sl, sl])
            grad.append(0.5 * (Gg + Gg.T))
        del Xi                  # (not kept beside the next step's rotated copy and its relaxation)
        if precondition:   # AdaGrad per block: channels whose gradients stay small still move
            acc = [h + float(np.sum(x * x)) for h, x in zip(acc, grad)] if acc else [float(np.sum(x * x)) for x in grad]
            grad = [x / math.sqrt(h) if h > 0 else x for x, h in zip(grad, acc)]
        scale = max(max((np.abs(x).max() if x.size else 0.0) for x in grad), 1e-300)
        a = step / scale
        while a * scale > 1e-8:
            Dn = [Dg + a * Gg for Dg, Gg in zip(D, grad)]
            if _feasible(w, Dn):
                D = Dn
                break
            a *= 0.5
        mu *= mu_decay
    return best_D, {"trace": trace, "best": best_val, "restarts": restarts_done}


# ============================================================================ interior-point sizes
# The per-column sizes of the block shifts in a fixed basis, by a primal-dual interior-point Newton method
# on the saddle problem  max_d min_z F_d(z)  (concave in d, convex in z): the relaxation's optimal
# perspective restricted to D_g = U_g diag(d_g) U_gᵀ. Measured on bench_exact's conv layers (3×3, m = 64,
# root bound / best known error): C = 32, n/d = 8.7: scalar 0.829, first-order ascent 0.910, these sizes in
# the basis of (M⁻¹)_gg 0.941; n/d = 2.2: 0.590 / 0.751 / 0.754, and 0.805 in the ascent's basis; C = 12,
# m = 8: 0.980 in the ascent's basis (SDP over full blocks: 0.996).
SADDLE_ITERATIONS = 40
# Barrier weights relative to F/(2r + 3C) (r whitened columns, C channels; F at the centre z = 1/2 start,
# well above the relaxation's value): start, floor, decrease per long (or centred) step. Start measured on
# bench_exact's conv layers, root bound / best error at C = 128, n/d = 8.7 and C = 32, n/d = 2.2: 0.1:
# 0.950 / 0.767, 0.3: 0.951 / 0.754, 1: 0.954 / 0.770, 3: 0.954 / 0.676; a start at the expected value
# (smaller) jams against M − diag d ⪰ 0 (0.90 at C = 128).
SADDLE_MU_START = 1.0
SADDLE_MU_END = 1e-6
SADDLE_MU_DECAY = 0.3
# Stop when the bound gained less than this (relative) over SADDLE_STALL iterations at the floor barrier.
SADDLE_STALL = 4
SADDLE_TOL = 1e-5
# Iterations the sizes need to be worth starting (their bound passes the scalar shifts' after ~10-15 and
# converges in ~30, bench_exact C = 128 / 256 3×3; at C = 512 3×3, n/d 8.7, root bound / best error per
# iteration: 0.40, 0.80, 0.85, 0.89, 0.92 at iterations 4–8, 0.93 at 10, 0.94 at 31, against 0.81 for the
# first-order ascent in its whole share and 0.70 for the scalar shifts: 10 is worth it there).
SADDLE_MIN_ITERATIONS = 10
# Relative gap F_d(z) − bound under which the iterate counts as centred (μ is lowered).
SADDLE_CENTRED = 1e-3


# Above this many whitened columns saddle_sizes (and exact.choose_shift) build their Newton systems in single
# precision: LAPACK's spotrf/spotri run ~3× faster than dpotrf/dpotri at r = 4,608 on one thread (0.7 + 1.7 s
# against 1.9 + 6.3 s). Only the Newton *directions* come from them: feasibility (M − diag d ⪰ 0) is still
# certified by a float64 Cholesky factorization, and the weights W of each bound by float64 refinement.
SINGLE_MIN_COLUMNS = 2000
# Rounds of iterative refinement (float64 residuals) of W = A⁻¹B from a single-precision inverse (the
# minorant at W is off the one at A⁻¹B by a term quadratic in the error: one round leaves ~(ε₃₂·κ(A))²).
REFINE_ROUNDS = 1
# Relative diagonal regularizations tried, in turn, on a float32 Newton system of the sizes that does not factor
# (cumulative); every iterate's bound is valid whatever the step, the step is only a direction.
SINGLE_REGULARIZATIONS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2)


def _sym_lower(X: np.ndarray, slab: int = 256) -> np.ndarray:
    """Copy the lower triangle of the square ``X`` onto its upper one, in place, slab by slab (a fancy-indexed
    copy over all of ``triu_indices`` took 3.1 s at r = 4,608 against 0.15 s for this)."""
    n = X.shape[0]
    for i in range(0, n, slab):
        j = min(i + slab, n)
        X[i:j, j:] = X[j:, i:j].T
        blk = X[i:j, i:j]
        iu = np.triu_indices(j - i, 1)
        blk[iu] = blk.T[iu]
    return X


def _inv_from_factor(c: np.ndarray) -> np.ndarray | None:
    """Inverse (full, symmetric) from a lower Cholesky factor ``c`` (overwritten; float32 or float64)."""
    import scipy.linalg.lapack as lapack

    potri = lapack.spotri if c.dtype == np.float32 else lapack.dpotri
    X, info = potri(c, lower=1, overwrite_c=1)
    if info != 0:
        return None
    return _sym_lower(X)


def _inv_spd(A: np.ndarray, *, overwrite: bool = False) -> np.ndarray | None:
    """Inverse of a symmetric positive definite matrix in ``A``'s precision (None when the Cholesky
    factorization fails)."""
    import scipy.linalg.lapack as lapack

    potrf = lapack.spotrf if A.dtype == np.float32 else lapack.dpotrf
    c, info = potrf(A, lower=1, clean=0, overwrite_a=int(overwrite))
    if info != 0:
        return None
    return _inv_from_factor(c)


def _checked_factor(M, shift: np.ndarray, dtype):
    """The float64 Cholesky factor of ``M − diag(shift)`` that certifies a step (None when it is not positive
    definite), lower, Fortran-ordered. For a Gram read lazily it is factored in panels read from the view (half an
    r×r) and handed over in ``dtype`` panel by panel (``dtype`` None: the caller keeps no factor, the panels are
    returned as they are): a float64 copy of ``M`` and its single-precision cast were 1.4× the statistics beside the
    sizes' float32 ``M`` at C = 512 3×3. An array ``M``: one copy factored in place (the lower factor in float64;
    the caller casts it)."""
    if isinstance(M, ScaledGram):
        try:
            pf = factor_principal(M, None, -shift, panel_min=0)
        except np.linalg.LinAlgError:
            return None
        return pf if dtype is None else pf.release_lower(dtype)
    Q = fortran_copy(M)
    Q[np.diag_indices_from(Q)] -= shift
    return _factors(Q)          # (Q's memory when it succeeded: no second name keeps it past its use)


def _factors(A: np.ndarray, *, single: bool = False) -> np.ndarray | None:
    """The lower Cholesky factor of ``A`` (``A`` overwritten; float32 with ``single``), None when ``A`` is not
    positive definite. Only a float64 factor certifies feasibility."""
    import scipy.linalg.lapack as lapack

    c, info = (lapack.spotrf if single else lapack.dpotrf)(A, lower=1, clean=0, overwrite_a=1)
    return c if info == 0 else None


def inverse_basis(w: Whitened, Minv: np.ndarray | None = None) -> list[np.ndarray]:
    """Each channel's eigenbasis of ``(M⁻¹)_gg``: the directions in which the channel is least (most)
    predictable from the others, i.e. the room ``M − D ⪰ 0`` leaves a shift on that channel alone."""
    if Minv is None:
        # (a basis only: float32 suffices above SINGLE_MIN_COLUMNS, and eigh below keeps U orthogonal)
        Minv = _inv_spd(w.M.astype(np.float32) if w.M.shape[0] >= SINGLE_MIN_COLUMNS else w.M)
        if Minv is None and w.M.shape[0] >= SINGLE_MIN_COLUMNS:
            Minv = _inv_spd(fortran_copy(w.M), overwrite=True)
        if Minv is None:
            return [np.eye(w.cols(g).stop - w.cols(g).start) for g in range(w.n_channels)]
    out = []
    for g in range(w.n_channels):
        sl = w.cols(g)
        if sl.stop == sl.start:
            out.append(np.zeros((0, 0)))
            continue
        blk = Minv[sl, sl].astype(np.float64)
        out.append(np.linalg.eigh(0.5 * (blk + blk.T))[1])
    return out


def compose(w: Whitened, U: list[np.ndarray], V: list[np.ndarray]) -> list[np.ndarray]:
    """Bases ``U_g V_g`` (``V`` expressed in the basis ``U``)."""
    return [u @ v if u.size else u for u, v in zip(U, V)]


def blocks(w: Whitened, U: list[np.ndarray], d: np.ndarray) -> list[np.ndarray]:
    """The blocks ``D_g = U_g diag(d_g) U_gᵀ`` (in ``w``'s basis) of per-column sizes ``d`` in bases ``U``."""
    out = []
    for g in range(w.n_channels):
        sl = w.cols(g)
        out.append((U[g] * d[sl]) @ U[g].T if sl.stop > sl.start else np.zeros((0, 0)))
    return out


def saddle_sizes(wr: Whitened, d0: np.ndarray, bound_of, *, k: int | None, budget: float | None = None,
                 costs: np.ndarray | None = None, iterations: int = SADDLE_ITERATIONS,
                 deadline: float | None = None,
                 min_iterations: int = 0,
                 single: bool | None = None) -> tuple[np.ndarray, float, np.ndarray | None, dict]:
    """Per-column shift sizes ``d`` (r,) for the rotated problem ``wr``, maximizing the relaxation value.

    Interior-point Newton on the saddle function (energies in units of ‖Y‖²)

        Λ(d, z) = F_d(z) + μ (log det(M − diag d) + Σ log d) − μ (Σ log z + Σ log(1 − z) + log(k − Σz))

    (``F_d(z) = ‖Y‖² − tr(Bᵀ (M + diag(d (1/z − 1)))⁻¹ B)``, concave in ``d``, convex in ``z``): one
    Newton step on ``∇Λ = 0`` per iteration (``z`` eliminated through its C×C block, the r×r Schur complement
    negative definite), fraction-to-the-boundary steps checked by a Cholesky factorization of
    ``M − diag d``, ``μ`` decreased after long (or centred) steps. Each iterate's weights ``W = A⁻¹B`` give the
    Fenchel minorant ``(L, a)`` of the relaxation, whose bound ``bound_of(L, a)`` (energy) is valid for
    every feasible ``d`` (M − diag d ⪰ 0, d > 0): the best one is returned with its sizes.

    ``d0`` must be strictly feasible. ``k``/``budget``/``costs``: the relaxation's constraints on z.
    The start is the centre ``z = 1/2`` (scaled into the constraints), whose ``F`` sets the barrier
    weights (a start at the relaxation's ``z`` with smaller weights jammed against ``M − diag d ⪰ 0``).
    ``min_iterations``: after the first iteration, give up (``info["gave_up"]``) when that many would not
    fit before ``deadline`` at its pace (the early iterates' bounds are far below the converged one).
    ``single``: build the Newton system in float32 (default: above ``SINGLE_MIN_COLUMNS`` columns); the
    bound stays valid either way (float64 feasibility checks, W refined in float64).
    Returns ``(d, bound, z, info)``; ``d = d0`` with ``bound = -inf`` when no step could be taken.
    Costs O(r³) per iteration (two inverses, one Schur factorization, the feasibility Cholesky of the
    step, whose factor the next iteration's inverse reuses in float32 runs) and a few r×r arrays of memory.
    """
    M, g, C = wr.M, wr.col_group, wr.n_channels
    r = M.shape[0]
    c = wr.target_sq
    Bn = wr.B / math.sqrt(c)
    sizes = np.diff(wr.starts)
    first = wr.starts[:-1][sizes > 0]
    live = np.flatnonzero(sizes > 0)
    rows = []                                 # constraints  a·z <= b  of the relaxation
    if k is not None:
        rows.append((np.ones(C), float(k)))
    if budget is not None:
        rows.append((np.asarray(costs, np.float64), float(budget)))
    z = np.full(C, 0.5)
    for a_row, b in rows:                    # strictly inside every constraint
        if a_row @ z >= 0.9 * b:
            z *= 0.9 * b / max(float(a_row @ z), 1e-300)
    z = np.clip(z, 1e-6, 1 - 1e-6)
    d = np.asarray(d0, np.float64).copy()
    best_d, best, best_z = d.copy(), -math.inf, None
    mu = mu_end = None
    trace: list[float] = []
    flat = 0
    diag = np.diag_indices(r)

    # (the r×r products below are summed a block of rows at a time, blocks along channel boundaries: the same
    # sums, bit for bit, as from one r×r temporary each; at C = 512 3×3 those were 0.47× the statistics apiece)
    channel_blocks = list(range(0, live.size, max(1, live.size // 16))) + [live.size]

    def row_of(j):                            # first row of live channel j (r past the last)
        return int(first[j]) if j < live.size else r

    def gsum_cols_scaled(X, col_scale):       # (r, C): column sums of X·diag(col_scale) over each channel's columns
        out = np.zeros((X.shape[0], C))
        for a, b in zip(channel_blocks[:-1], channel_blocks[1:]):
            lo, hi = row_of(a), row_of(b)
            out[lo:hi, live] = np.add.reduceat(X[lo:hi] * col_scale[None, :], first, axis=1)
        return out

    def channel_sums(X, scale):               # (C', C'): P'(X ∘ scale scaleᵀ)P, channel by channel
        parts = []
        for a, b in zip(channel_blocks[:-1], channel_blocks[1:]):
            lo, hi = row_of(a), row_of(b)
            blk = X[lo:hi] * scale[None, :]
            blk *= scale[lo:hi, None]
            parts.append(np.add.reduceat(np.add.reduceat(blk, first[a:b] - lo, axis=0), first, axis=1))
        return np.vstack(parts)

    if single is None:
        single = r >= SINGLE_MIN_COLUMNS
    ft = np.float32 if single else np.float64

    def fresh_m() -> np.ndarray:
        """A new Fortran-ordered copy of ``M`` in ``ft``, to be factored in place. In single precision it is read
        afresh each time instead of kept beside the iteration's r×r arrays (a float32 ``M`` held throughout was
        0.47× the statistics at C = 512 3×3; a read from the view costs 0.32 s there against 0.18 s for a copy)."""
        if not single:
            return np.array(M, order="F")
        if isinstance(M, ScaledGram):
            return M.dense(np.float32).T      # (M symmetric: the transpose of the C-ordered read is M in Fortran order)
        return np.array(M, dtype=np.float32, order="F")

    Bf = Bn.astype(ft)
    qfac = None                               # float64 factor of M − diag d from the last step's check
    factorizations = 0                        # float64 feasibility checks (Cholesky) of the steps
    gave_up = False
    t_start = time.perf_counter()
    for it in range(iterations):
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            break
        if (deadline is not None and it == 1 and min_iterations
                and (deadline - now) < (min_iterations - 1) * (now - t_start)):
            gave_up = True           # the method would stop far from converged: leave the time to others
            break
        s = (1.0 / z - 1.0)[g]
        A = fresh_m()            # (in LAPACK's order: factored in place, not copied once more)
        A[diag] += (d * s).astype(ft)
        K = _inv_spd(A, overwrite=True)
        del A
        if K is None:
            break
        W = (K @ Bf).astype(np.float64)
        for _ in range(REFINE_ROUNDS if single else 0):   # float64 residuals: W accurate to ~(ε₃₂·κ)²
            R = Bn - M @ W
            R -= (d * s)[:, None] * W
            W += K @ R.astype(ft)
        # the Fenchel minorant at W (valid for every set): L = 1 − ⟨W, QW⟩, a_g = Σ ‖V_j‖²/d_j, V = B − QW
        QW = M @ W
        QW -= d[:, None] * W
        V = Bn - QW
        L = 1.0 - float(np.sum(W * QW))
        a = np.bincount(g, weights=np.sum(V * V, axis=1) / d, minlength=C)
        del QW, V
        val = float(bound_of(L * c, a * c))
        trace.append(val)
        if val > best * (1 + SADDLE_TOL) + 1e-300 or best == -math.inf:
            flat = 0
        else:
            flat += 1
        if val > best:
            best, best_d, best_z = val, d.copy(), z.copy()
        Fz = 1.0 - float(np.sum(Bn * W))
        if mu is None:
            ref = max(Fz, 1e-12)
            mu = SADDLE_MU_START * ref / (2 * r + 3 * C)
            mu_end = SADDLE_MU_END * ref / (2 * r + 3 * C)
        if mu <= mu_end and flat >= SADDLE_STALL:
            break
        X = None
        if qfac is not None and single:
            # (the step's own check factored M − diag d − MARGIN·I; float64 runs factor M − diag d afresh: near
            # the end λ_min(M − diag d) can be of MARGIN's order, and on the digits CNN's C = 32 group the
            # reused factor stalled the sizes at 0.185 of the best error instead of climbing past 0.22)
            X = _inv_from_factor(qfac)        # (already in single precision: see the step's check)
        qfac = None
        if X is None:
            Q = fresh_m()
            Q[diag] -= d.astype(ft)
            X = _inv_spd(Q, overwrite=True)
            del Q
        if X is None and single:              # float32 cannot factor it: float64 can
            Q = fortran_copy(M)
            Q[diag] -= d
            X = _inv_spd(Q, overwrite=True)
            del Q
            if X is not None:
                X = X.astype(ft)
        if X is None:
            break
        omega = np.sum(W * W, axis=1)
        Wf = W.astype(ft)
        if single:                             # K = A⁻¹ ∘ WWᵀ (PSD), WWᵀ a block of rows at a time: no r×r beside
            step = max(1, r // 16)             # K and X (0.47× the statistics apiece at C = 512 3×3)
            for i in range(0, r, step):
                K[i:i + step] *= Wf[i:i + step] @ Wf.T
        else:
            K *= Wf @ Wf.T
        del Wf
        sp = (-1.0 / z ** 2)                   # ds/dz per channel
        spc = sp[g]
        # gradient
        Ld = s * omega + mu * (1.0 / d - np.diag(X))
        Fs = d * omega
        slack = [b - float(a_row @ z) for a_row, b in rows]
        Lz = np.bincount(g, weights=Fs * spc, minlength=C) - mu * (1.0 / z - 1.0 / (1.0 - z))
        for (a_row, _), sl_ in zip(rows, slack):
            Lz += mu * a_row / sl_
        # z block: F_zz = P'(sp d K d sp)P + diag(2/z³ Σ_g Fs), barrier
        v = (d * spc).astype(ft)
        Fzz = np.zeros((C, C))
        Fzz[np.ix_(live, live)] = -2.0 * channel_sums(K, v)
        Fzz[np.diag_indices(C)] += (2.0 / z ** 3) * np.bincount(g, weights=Fs, minlength=C)
        Lzz = Fzz
        Lzz[np.diag_indices(C)] += mu * (1.0 / z ** 2 + 1.0 / (1.0 - z) ** 2)
        for (a_row, _), sl_ in zip(rows, slack):
            Lzz += mu * np.outer(a_row, a_row) / sl_ ** 2
        # mixed block: F_dz[j, h] = sp_h (ω_j [j ∈ h] − 2 s_j Σ_{i∈h} K_ji d_i)
        Fdz = gsum_cols_scaled(K, d.astype(ft))
        Fdz *= -2.0 * s[:, None]
        Fdz[np.arange(r), g] += omega
        Fdz *= sp[None, :]
        # d block: −2 S K S − μ X∘X − μ diag(1/d²), into X
        X *= X
        X *= -mu
        sf = s.astype(ft)
        K *= sf[None, :]
        K *= sf[:, None]
        K *= 2.0
        X -= K
        del K
        X[diag] -= (mu / d ** 2).astype(ft)
        try:
            cz = scipy.linalg.cho_factor(Lzz, check_finite=False)
        except np.linalg.LinAlgError:
            break
        T1 = scipy.linalg.cho_solve(cz, Fdz.T, check_finite=False)          # (C, r)
        if single:                             # Schur complement (negative definite), the r×r product in row blocks
            subtract_product(X, Fdz.astype(ft), T1.astype(ft), block_entries=max(1 << 16, r * r // 16))
        else:
            X -= Fdz @ T1
        rhs = -Ld + T1.T @ Lz
        X *= -1.0
        step_d = None
        # (float32 Newton systems that no small regularization factors are damped further rather than ending the
        # sizes: at C = 512 3×3 the restarted problem's sizes stopped at 25–32 of 40 iterations with 45–109 s of
        # their share left and the bound still climbing, session 32)
        # The system is factored in X's own memory (a copy was a third r×r: 0.47× the statistics at C = 512 3×3).
        # The factorization reads and overwrites the upper triangle; where it fails, the untouched lower one gives it
        # back before the next regularization.
        dg = X[diag].copy()
        for reg in (0.0, 1e-12, 1e-9, 1e-6) if not single else SINGLE_REGULARIZATIONS:
            if reg:
                dg += reg * np.abs(dg)
                X[diag] = dg
            try:
                cf = scipy.linalg.cho_factor(X, overwrite_a=True, check_finite=False)
                step_d = -scipy.linalg.cho_solve(cf, rhs.astype(ft), check_finite=False).astype(np.float64)
                del cf
                break
            except np.linalg.LinAlgError:
                _sym_lower(X)
                X[diag] = dg
                continue
        del X
        if step_d is None:
            break
        step_z = -scipy.linalg.cho_solve(cz, Lz + Fdz.T @ step_d, check_finite=False)
        del Fdz, T1
        # fraction to the boundary of d > 0, 0 < z < 1 and the constraints, then M − diag d ≻ 0
        al = 1.0
        neg = step_d < 0
        if neg.any():
            al = min(al, 0.95 * float(np.min(d[neg] / -step_d[neg])))
        neg = step_z < 0
        if neg.any():
            al = min(al, 0.95 * float(np.min(z[neg] / -step_z[neg])))
        pos = step_z > 0
        if pos.any():
            al = min(al, 0.95 * float(np.min((1.0 - z[pos]) / step_z[pos])))
        for (a_row, _), sl_ in zip(rows, slack):
            grow = float(a_row @ step_z)
            if grow > 0:
                al = min(al, 0.95 * sl_ / grow)
        checks = 0
        while al > 1e-12:
            shift = d + al * step_d + MARGIN
            if single:              # a float32 factorization rejects most failing steps at a third of the cost
                Q = fresh_m()
                Q[diag] -= shift.astype(ft)
                ok = _factors(Q, single=True) is not None
                del Q
                if not ok:
                    al *= 0.5
                    continue
            checks += 1
            qfac = _checked_factor(M, shift, ft if single else None)
            if qfac is not None:
                break
            al *= 0.5
        else:
            break
        factorizations += checks
        # (the next iteration inverts the check's factor in single precision: cast now, so that the float64
        # factor is not held through that iteration's other r×r work)
        qfac = qfac.astype(ft, copy=False) if single and qfac is not None else None
        d = d + al * step_d
        z = z + al * step_z
        # a long step, or z already (nearly) optimal for d: close enough to the central path to lower μ
        if al > 0.5 or (val > -math.inf and Fz - val / c <= SADDLE_CENTRED * Fz):
            mu = max(mu * SADDLE_MU_DECAY, mu_end)
    return best_d, best, best_z, {"trace": trace, "iterations": len(trace), "gave_up": gave_up,
                                  "feasibility_checks": factorizations}


__all__ = ["optimize_shift", "rotate", "eig_blocks", "saddle_sizes", "inverse_basis", "blocks", "compose"]
