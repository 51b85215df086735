"""Exact group subset selection with a certified gap (``method="exact"``).

Problem: ``min err(S)`` over channel sets ``S`` with ``|S| <= k`` and/or ``Σ_{g∈S} cost_g <= budget``,
where ``err(S)`` is the relative error of the least-squares refit (``SelectionProblem.error``) —
the *unregularized* problem: every bound reported here is a proven lower bound on it.

The bound: a perspective relaxation valid without any ridge
-----------------------------------------------------------
Work in whitened coordinates (:func:`solvers.selection.greedy.whiten`: each channel's columns orthonormal, so
``M = ZᵀZ`` has identity diagonal blocks; refit errors are unchanged). Pick per-channel
``t_g >= 0`` with ``Q = M − T ⪰ 0`` (``T`` = ``t_g`` on channel ``g``'s columns). For binary ``z``,

    err(S)·‖Y‖² = F(z) = min_W  ‖Y‖² − 2⟨W, B⟩ + ⟨W, Q W⟩ + Σ_g t_g ‖W_g‖² / z_g ,

because ``t‖W_g‖²/z_g`` is the perspective of ``t‖W_g‖²`` (it forces ``W_g = 0`` when ``z_g = 0``
and equals ``t‖W_g‖²`` when ``z_g = 1``). ``F`` is convex on ``[0, 1]^C`` and, by Fenchel duality,
*every* ``W`` gives an affine minorant of it: with ``V = B − Q W``,

    F(z) >= L(W) − Σ_g a_g(W) z_g,   L = ‖Y‖² − ⟨W, Q W⟩,   a_g = ‖V_g‖² / t_g      (all z >= 0).

Minimizing the right-hand side over the feasible ``z`` of a branch-and-bound node (``z_g = 1`` for
channels fixed in, 0 for those fixed out, ``Σ z <= k`` / ``Σ cost·z <= budget`` over the rest) is a
top-r sum (or a fractional knapsack), so each node's bound is valid for any ``W`` — computing it well
only makes it tight. We take ``W`` from the relaxed problem ``min_z F(z)`` solved approximately by
Frank–Wolfe (a linear solve with ``M_TT + diag(t(1/z − 1))`` per step), and choose ``t`` once by
maximizing ``Σ t_g + μ log det(M − T)`` (Newton in C variables, μ → 0; ``0.9·λ_min(M)`` when
``M`` has thousands of columns), the trace-maximal diagonal shift in the spirit of Dong, Chen &
Linderoth (2015). By default (``shift="block"``) the shift then becomes block-diagonal,
``D = blkdiag(D_g)`` with ``M − D ⪰ 0`` (:mod:`solvers.selection.perspective`: the optimal perspective
extended to groups): per-column sizes in each channel's eigenbasis of ``(M⁻¹)_gg`` by an interior-point
Newton method on the saddle problem ``max_D min_z F_D(z)``, then supergradient ascent for better
directions and the sizes once more in its basis (``shift="ascent"``: the ascent alone, the default
before), kept when its root bound beats the scalar one; everything below holds with ``t_g‖W_g‖²`` read as
``tr(W_gᵀ D_g W_g)`` (each block written in its eigenbasis). ``W`` = the fitted weights of a single set ``S``
gives the outer-approximation cut of Bertsimas & Van Parys (2020) at ``S``, but for the
unregularized objective (their ridge ``1/γ‖W‖²`` is replaced by the shift ``T`` taken out of ``M``).
With all ``t = 0`` the bound degrades to the monotone bound ``err(S) >= err(S ∪ undecided)``.
At a node the condition is weaker — fixed-in channels need no shift and fixed-out columns drop out
of ``M − D ⪰ 0`` — so ``bound="conditional"`` (default) raises the free channels' shifts node by node
(:mod:`solvers.selection.conditional`).

Since the minorant is valid for *any* ``W`` and concave in it, large layers also get a bound without
factorizations past the shift's: :func:`_cut_ascent` climbs it from the incumbent's cut, one ``r×r·m``
product per step. It is the whole bound where no root relaxation fits the time limit (C = 11,008 at 60 s),
and raises a large layer's scalar root where the block sizes did not fit (``CUT_ROOT``).

Backends
--------
* ``"bnb"`` (default): best-first branch and bound over channels with the node bound above,
  reduced-cost fixing (the same ``(L, a)`` bounds both children of every free channel for free),
  and incumbents from forward/backward greedy, LASSO, 1-swap local search and rounding at nodes.
  Cardinality problems with at most ``ENUMERATE_MAX`` sets of k channels (C = 16, k = 8: 12,870) are
  instead solved by evaluating every set (batched ``M_SS`` solves) when that fits the time limit:
  the optimum proven by enumeration (``info["enumerated"]``), where the relaxation is weakest.
* ``"highs"``: outer approximation with a HiGHS MILP master over binary ``z`` and ``η``: cuts
  ``η >= L − Σ a_g z_g`` at the root relaxation's iterates and at each master solution; the
  master's optimum is a lower bound, each master solution an incumbent (multi-tree).
* ``"scip"``: the same cuts added lazily inside one SCIP branch-and-bound tree (a constraint
  handler separating at LP solutions: LP/NLP-based branch and bound), via pyscipopt.

Results: ``objective`` the true refit error of the best set found, ``bound`` a proven lower bound
on the optimum (over the feasible sets), ``gap`` relative, ``status`` OPTIMAL when ``gap <= rel_gap``
(default 1e-4), else TIME_LIMIT when the clock stopped it (never OPTIMAL on time out) or FEASIBLE
when an OA master stalled on round-off before closing the gap, ``iterations`` B&B nodes / OA
iterations / SCIP nodes, ``info`` details (``t`` statistics, root bound, incumbent sources).
"""
from __future__ import annotations

import heapq
import importlib.util
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from solvers.selection.baselines import result_from_mask
from solvers.selection.conditional import node_shift
from solvers.errors import InvalidInputError, SolverError, SolverNotAvailableError
from solvers.selection.block_gram import BlockGram
from solvers.selection.greedy import (Whitened, backward_mask, backward_start_fits, densified, forward_mask, refit_seconds,
                                      whiten)
from solvers.selection.panel_cholesky import factor_principal, solve_gathered
from solvers.selection.perspective import (SADDLE_MIN_ITERATIONS, SINGLE_MIN_COLUMNS, _inv_spd, blocks,
                                          eig_blocks, inverse_basis, optimize_shift, rotate, saddle_sizes)
from solvers.selection.problem import SelectionProblem
from solvers.selection.restart import reduce_problem
from solvers.selection.scaled_gram import ScaledGram, gathered_product
from solvers.selection.swap import improve_by_swaps
from solvers.result import SelectionResult, Status

BACKENDS = ("bnb", "highs", "scip")
# Node bounds of the B&B: "perspective" (the root's shifts everywhere) or "conditional" (shifts
# re-certified at each node on the free channels, :mod:`solvers.selection.conditional`).
BOUNDS = ("perspective", "conditional")
# Perspective shifts: one per channel ("scalar"), block-diagonal by first-order ascent alone ("ascent", the
# default before session 5) or by interior-point sizes plus the ascent's directions ("block").
SHIFTS = ("block", "ascent", "scalar")
DEFAULT_GAP = 1e-4
# Shifts below this (whitened units, where M_gg = I) count as zero: that channel gets no perspective
# term and must stay in every relaxed support (monotone bound only).
T_MIN = 1e-9
# Above this many whitened columns the shift search skips Newton (O(r³) per step) for 0.9·λ_min(M)
# (C = 512 3×3, r = 4608, still gets Newton: its λ_min is ~200× below the Newton shifts).
NEWTON_MAX_COLUMNS = 8192
# Smallest eigenvalue kept in M − T after the Newton search (so Q ⪰ 0 survives round-off).
Q_MARGIN = 1e-9
# Bounds are lowered by this much (relative error units) to absorb round-off in L − Σ a z.
BOUND_SAFETY = 1e-12
# Branching: "frac" (most fractional relaxed z; measured best) or "bound" (strongest weaker child).
BRANCH_RULE = "frac"
# Evaluate the minorant once more after the last Frank–Wolfe step of a node (0 skips it).
FINAL_DUAL = 1
# Frank–Wolfe steps at the root, run towards convergence (its minorant drives the first reduced-cost
# fixings and OA cuts): measured on bench_exact's C = 64 3×3 layer, the root gap falls from 28 %
# (stopping at the first "cannot prune" sign) to 13 % in 10 steps and 12.9 % in 50.
ROOT_ITERATIONS = 50
# Frank–Wolfe steps of the root relaxation in the block shifts' basis when the interior-point sizes already
# gave its relaxed point and minorant (branch and bound only; the OA backends need the root's cuts). The
# converged run never beat the sizes' own bound on bench_exact's 3×3 layers and cost 11 s at C = 256 (one
# thread) and 58 s at C = 512 (two): the tree's root node takes its own step from the sizes' point anyway.
ROOT_ITERATIONS_AFTER_SIZES = 1
# Root restarts (backend "bnb"): when the root's reduced-cost fixings settle at least this share of the whitened
# columns, the free channels' problem is solved afresh (:mod:`solvers.selection.restart`), if at least
# RESTART_MIN_SECONDS are left. Measured on bench_exact's 3×3 layers at 300 s: C = 256, the root fixed 73 of 256
# channels in; gap 1.57 % against 1.94 % in one process, 0.55 % against 1.41 % with two workers. C = 512 (with
# the shares below): 4.81 % against 5.76 %.
RESTART_MIN_SHARE = 0.1
RESTART_MIN_SECONDS = 1.0
# ... and only from this many whitened columns on does the restarted problem search shifts of its own (interior-point
# sizes), where its tree gains little past its root: C = 512 3×3 (4,608 columns, 2 workers), 4.81 % against 5.76 %
# without a restart. Below, that second search costs more than it buys: C = 128 3×3 (1,152 columns) was proven
# optimal in 77 s with it against 63 s without (one process), and C = 256 3×3 (2,304) ended at 1.57 % / 0.55 %
# (one process / 2 workers) with it against 0.92 % / optimal in 215 s with the cheap restart below.
RESTART_MIN_COLUMNS = 3000
# ... below it, from this many columns on, a cheap restart instead: the restarted problem keeps the root's shifts
# (valid for the Schur complement, see :func:`_inherited_shift`) and searches none of its own, so the tree gets the
# time and factors fewer columns. C = 128 3×3: optimal in 53 s against 70 s without a restart (one process, same
# run; 40 s against 44 s with two workers); C = 64 3×3 (576 columns): 8.8 s against 9.5 s.
RESTART_INHERIT_MIN_COLUMNS = 500
# Assumed speed of one dense factorization (flop/s, one core) when deciding whether an uninterruptible
# O(r³) step still fits in the time limit.
FLOP_RATE = 1e10
# Past the size where the root relaxation fits the time limit (each of its Frank–Wolfe steps factors r×r), the
# bound comes from a first-order ascent on the minorant's weights instead (:func:`_cut_ascent`): two factorizations
# (the scalar shift's estimate and its check) at the machine's measured speed, then one r×r·m product per step.
# It starts at the incumbent's outer-approximation cut. Measured on bench_exact's population layer C = 2,048
# (1×1, m = 256, k = 1,024; 2 threads): 60 steps in 5.4 s end 3.2 % below the incumbent, where the
# Frank–Wolfe root with interior-point sizes ends 5.2 % below it after 60 s; the cut alone 20.3 %. (Counted: the two
# factorizations and the inverse iteration's solves between them; the ascent's own steps are interruptible.)
CUT_FACTORIZATIONS = 2.2
# ... and after the warm start, the first of them (with the inverse iteration's solves) must fit at the measured
# speed; the second is then timed by the first (one 3,072² probe measures 27–41 GFLOP/s between runs on the same
# idle CPU, the 11,008² factorization itself ~41).
CUT_FIRST_FACTORIZATIONS = 1.5
CUT_MAX_STEPS = 200
# ... its step: W ← W + η (Z V / t − W) with z the running average of the linear minimization's points (the
# Frank–Wolfe weights 2/(i+2)); η the best of these on the minorant (one product gives them all).
CUT_STEPS_GRID = 2.0 ** -np.arange(0, 14)
# ... and the warm start then stops at this share of the limit (the rest: shift, ascent); the machine's speed is
# measured on two factorizations of this size (0.25 s each on the 2-core CPU).
CUT_WARM_SHARE = 0.3
CUT_RATE_SIZE = 3072
# The same ascent after a large layer's scalar root (more than BLOCK_LARGE_COLUMNS whitened columns, block sizes
# not used), for at most this share of the time limit; its minorant replaces the root's when it bounds more.
CUT_ROOT = True
CUT_ROOT_SHARE = 0.3
# ... and with it on, large layers skip the block shifts when this many r×r factorizations (about their first three
# interior-point iterations) do not fit their share: C = 512 3×3 needs ~33 s of a 240 s share, C = 1,024 3×3 ~260 s.
BLOCK_MIN_FACTORIZATIONS = 10
# ... and layers of one whitened column per channel from this many columns on (1×1 convs, MLPs) skip the block
# shifts altogether (their "blocks" are the diagonal shifts the Newton search also climbs), give the Newton search
# ONE_COLUMN_SHIFT_SHARE of the limit and raise its root by the ascent. Measured on bench_exact's population layer
# C = 2,048 (1×1, m = 256, k = 1,024, 60 s, 2 threads): see RESULTS.md, session 15.
ONE_COLUMN_ASCENT_MIN = 2000
ONE_COLUMN_SHIFT_SHARE = 0.25
# Shares of the time limit: the warm-start heuristics stop at WARM_SHARE of it, the scalar shift
# search gets SHIFT_SHARE, the block-shift ascent BLOCK_SHARE (what is left goes to the root and tree).
WARM_SHARE = 0.3
SHIFT_SHARE = 0.15
BLOCK_SHARE = 0.25
# shift="block": the scalar search gets only this share, the block shifts the rest of SHIFT_SHARE too.
SHIFT_SHARE_BLOCK = 0.03
# A relaxed solve's dual gathers M[N, T] (the unsolved rows against the solved columns) a block of rows at a time
# past this many entries (2 MB): |N|·|T| reaches r²/4, a quarter of the Gram, in one gather.
DUAL_BLOCK_ENTRIES = 1 << 18
# ... and a shifted product subtracts T W in row blocks of this many entries (elementwise: the same bits at any size).
SHIFT_BLOCK_ENTRIES = 1 << 16
# Cardinality problems with at most this many sets of k channels are solved by evaluating them all
# (C = 16, k = 8: 12,870 refits, ~1 s) — the digits CNN's first layer kept a 37 % gap after 10 s of
# branch and bound (λ_min(M) ≈ 0.004: the perspective bound is near the monotone one there).
ENUMERATE_MAX = 20_000
ENUMERATE_BATCH = 256
# Round-off allowance of the batched enumeration solves (relative error units).
ENUMERATE_SAFETY = 1e-12
# Share of the time limit the enumeration may take (it is only tried when its estimate fits).
ENUMERATE_SHARE = 0.8
# The LASSO warm start is skipped from this many channels on (its C×C channel Gram would double the
# memory of 1-column statistics).
LASSO_WARM_MAX_CHANNELS = 4096
# shift="block": the interior-point sizes in the basis of (M⁻¹)_gg run until they converge; when that took
# less than this share of the block-shift time, the first-order ascent (directions) runs from those blocks
# and the sizes once more in the ascent's basis (:func:`_newton_blocks`).
SIZES_SHARE = 0.5
# shift="block" with more whitened columns than this: the block shifts get BLOCK_SHARE_LARGE of the time
# limit (the sizes need ~30 iterations of O(r³); at C = 512 3×3 the tree processed 5 nodes in 300 s, so
# the root bound is what the time buys).
BLOCK_LARGE_COLUMNS = 3000
BLOCK_SHARE_LARGE = 0.6
# ... with root restarts on, the first root gets less (its job is the fixings: the restarted problem sizes its own
# shifts from scratch) and a restarted problem more (past its root its tree gains little at this size).
BLOCK_SHARE_LARGE_BEFORE_RESTART = 0.4
BLOCK_SHARE_LARGE_RESTARTED = 0.8
# ... and the scalar shifts' root Frank–Wolfe there gets this many steps (C = 512 3×3: each ~4–6 s under load).
SCALAR_ROOT_ITERATIONS_LARGE = 5
# Frank–Wolfe steps per block-shift ascent step (warm-started from the previous relaxed point).
SHIFT_FW_STEPS = 5
# Converging Frank–Wolfe runs (root, shift ascent) shorten a step whose quadratic-model length did not
# decrease F up to this many times (×1/4 each) before giving up. Without it the root relaxation with
# block shifts stopped at its first failed step on the study's C = 12, n/d = 2.2 layer (root bound 0
# instead of 0.96 of the optimum); nodes (converge=False) keep the cheap single try.
LINE_BACKTRACKS = 6


# ===================================================================================== relaxation
def choose_shift(w: Whitened, *, deadline: float | None = None) -> np.ndarray:
    """Per-channel shifts ``t`` (C,) with ``M − T ⪰ 0``, maximizing ``Σ t`` (log-det barrier Newton).

    Returns zeros when ``M`` is (numerically) singular — collinear channels leave no room for a
    shift, and the bound falls back to monotonicity.
    """
    M, g, C = w.M, w.col_group, w.n_channels
    r = M.shape[0]
    if r == 0:
        return np.zeros(C)
    timing: dict = {}
    lam_min = _lambda_min(M, timing)
    if lam_min <= 10 * Q_MARGIN:
        return np.zeros(C)
    if r > NEWTON_MAX_COLUMNS:
        # Each Newton step inverts M (O(r³)) and solves a C×C system: too slow here. The uniform
        # shift 0.9·λ_min (Frangioni & Gentile's choice), checked by one Cholesky below, instead
        # (none started that the estimate's own factorization time says would end past the deadline).
        t = np.where(np.bincount(g, minlength=C) > 0, 0.9 * lam_min, 0.0)
        return _with_margin(M, g, t, halve=True, deadline=deadline, factor_seconds=timing.get("factor_s"))
    # (group sums by reduceat over the contiguous column blocks: no r×C indicator matrix)
    size = np.bincount(g, minlength=C).astype(np.float64)
    live = size > 0                        # dead channels (no columns) need no shift
    t = np.where(live, 0.5 * lam_min, 0.0)
    mu = 1.0
    idx = np.flatnonzero(live)
    first = w.starts[idx]                  # strictly increasing: dead channels left out
    tl = t[idx]

    def shifted(tv: np.ndarray, dtype=np.float64) -> np.ndarray:
        # (one copy, in the precision asked; its transpose, the same symmetric matrix, is in LAPACK's order and
        # is factored in place: a C-ordered one would be copied once more)
        A = M.astype(dtype)
        A[np.diag_indices_from(A)] -= np.repeat(tv, size[idx].astype(np.int64)).astype(dtype)
        return A.T

    single = r >= SINGLE_MIN_COLUMNS          # (the Newton direction only: feasibility is checked in float64)
    # one column per live channel: the channel sums below are the matrices themselves (no reduceat copies)
    singles = idx.size == r
    pace = 0.0                                # seconds of the last Newton step
    while mu > 1e-6:
        for _ in range(4):
            # (no step that would end past the deadline: at C = 512 3×3 one took ~12 s and the 9 s search 31 s)
            if deadline is not None and time.perf_counter() + pace > deadline:
                break
            t_step = time.perf_counter()
            X = _inv_spd(shifted(tl, np.float32 if single else np.float64), overwrite=True)
            if X is None and single:
                # (float32 round-off broke the factorization: float64, still inverted in place)
                X = _inv_spd(shifted(tl), overwrite=True)
            if X is None:
                X = np.linalg.inv(shifted(tl))
            grad = size[idx] - mu * np.add.reduceat(np.diag(X), first) + mu / tl
            np.multiply(X, X, out=X)
            if singles and single:
                # (one column per channel past SINGLE_MIN_COLUMNS: the Newton system −H = μ·X∘X + μ/t², SPD, in
                # X's own memory and precision (float32 unless that failed), factored there; a float64 copy of it
                # and LU's copy of that were 1.3× the statistics at C = 2,048. The direction only: every step's
                # point is certified in float64 below)
                X *= mu
                X[np.diag_indices_from(X)] += (mu / tl ** 2).astype(X.dtype)
                try:
                    # (X is symmetric: whichever of X, Xᵀ is in LAPACK's order is factored in place)
                    cf = scipy.linalg.cho_factor(X if X.flags.f_contiguous else X.T, lower=True, overwrite_a=True,
                                                 check_finite=False)
                    step = scipy.linalg.cho_solve(cf, grad.astype(X.dtype), check_finite=False).astype(np.float64)
                except np.linalg.LinAlgError:
                    break
                del X, cf
            else:
                H = (np.asarray(X, dtype=np.float64) if singles
                     else np.add.reduceat(np.add.reduceat(X, first, axis=0), first, axis=1).astype(np.float64))
                del X
                H *= -mu
                H[np.diag_indices_from(H)] -= mu / tl ** 2
                try:
                    step = np.linalg.solve(H, -grad)
                except np.linalg.LinAlgError:
                    break
                del H
            a = 1.0
            while a > 1e-10:
                tn = tl + a * step
                if np.all(tn > 0):
                    try:
                        _factor_shifted(M, np.repeat(tn, size[idx].astype(np.int64)))   # (in panels: panel_threshold)
                        break
                    except np.linalg.LinAlgError:
                        pass
                a *= 0.5
            else:
                break
            tl = tn
            pace = time.perf_counter() - t_step
            if np.abs(a * step).max() < 1e-10:
                break
        mu *= 0.3
        if deadline is not None and time.perf_counter() + pace > deadline:
            break
    t[idx] = tl
    return _with_margin(M, g, t)


def _with_margin(M: np.ndarray, g: np.ndarray, t: np.ndarray, *, halve: bool = False,
                 deadline: float | None = None, factor_seconds: float | None = None) -> np.ndarray:
    """Shrink ``t`` until ``M − T − Q_MARGIN·I`` has a Cholesky factor (zeros if it never does).

    Shrinks by 0.999 (then 0.9) per failure after a Newton search, which ends just inside the
    boundary; by half (``halve``) after an estimate, which may be off by more. Past ``deadline``
    it gives up with zeros (no shift: still a valid, monotone, bound).
    """
    t = t.copy()
    for attempt in range(60):
        # (``factor_seconds``, one factorization's measured time: no attempt that would end past the deadline)
        if deadline is not None and (attempt or factor_seconds is not None) and \
                time.perf_counter() + (factor_seconds or 0.0) > deadline:
            t[:] = 0.0
            break
        try:
            _factor_shifted(M, t[g] + Q_MARGIN)
            break
        except np.linalg.LinAlgError:
            t *= 0.5 if halve else 0.999 if attempt < 10 else 0.9
    else:
        t[:] = 0.0
    return t


def _factor_shifted(M, shift: np.ndarray | float | None = None):
    """Cholesky factor of ``M − diag(shift)`` (``numpy.linalg.LinAlgError`` when it is not positive definite):
    past :func:`~solvers.selection.panel_cholesky.panel_threshold` columns a :class:`PanelCholesky` (half the memory
    of an r×r, M read panel by panel: a :class:`ScaledGram` is never built whole), else LAPACK's factor of one r×r
    copy."""
    return factor_principal(M, None, -np.asarray(0.0 if shift is None else shift, dtype=np.float64))


def _solve_factored(cf, v: np.ndarray) -> np.ndarray:
    """``A⁻¹ v`` with ``cf`` from :func:`_factor_shifted`."""
    return cf.solve(v)


def _lambda_min(M: np.ndarray, timing: dict | None = None) -> float:
    """Smallest eigenvalue of the symmetric ``M`` (0 when it is not positive definite).

    Large ``M`` (over 3000 columns) or one read lazily: an *estimate* from inverse power iteration on
    one Cholesky factor (O(r³/3) plus cheap triangular solves; Lanczos converges far too slowly on
    these spectra and a full eigvalsh costs ~12× the Cholesky; a lazy Gram's factor comes in panels, where
    eigvalsh would densify it: one more r×r beside the statistics). It is never below the true value, so
    callers verify any shift derived from it (:func:`_with_margin`).
    """
    r = M.shape[0]
    if r <= 3000 and isinstance(M, np.ndarray):
        return float(np.linalg.eigvalsh(M)[0])
    t0 = time.perf_counter()
    try:
        cf = _factor_shifted(M)
    except np.linalg.LinAlgError:
        return 0.0
    if timing is not None:
        timing["factor_s"] = time.perf_counter() - t0     # (``timing``: the factorization's seconds)
    v = np.random.default_rng(0).normal(size=r)
    rho = 0.0
    for _ in range(40):
        v /= np.linalg.norm(v)
        u = _solve_factored(cf, v)
        rho_new = float(v @ u)                  # Rayleigh quotient of M⁻¹: <= 1/λ_min
        v = u
        if rho_new > 0 and abs(rho_new - rho) <= 1e-4 * rho_new:
            rho = rho_new
            break
        rho = rho_new
    return 1.0 / rho if rho > 0 else 0.0


class Relaxation:
    """The perspective relaxation of one problem: relaxed solves and dual ``(L, a)`` minorants.

    Energies are in units of ``‖Y‖²`` (``target_sq``): divide by it for relative errors. Channels
    without a shift (``t_g <= T_MIN``) have no perspective term: they stay in every relaxed support
    unless fixed out, and get ``a_g = 0`` (valid because the solve makes ``V_g = 0`` for them).
    """

    def __init__(self, w: Whitened, t: np.ndarray):
        self.w = w
        t = np.asarray(t, dtype=np.float64)
        C, g = w.n_channels, w.col_group
        if t.shape == (C,):                       # one shift per channel: T = t_g·I on its block
            tc = t[g]
        elif t.shape == (g.size,):                # one per whitened column: a block-diagonal D = blkdiag(D_g)
            tc = t                                # written in the eigenbasis of each D_g (see perspective.py)
        else:
            raise InvalidInputError(f"t must have shape ({C},) or ({g.size},); got {t.shape}")
        low = np.full(C, np.inf)
        np.minimum.at(low, g, tc)
        # A channel gets a perspective term only when its whole block is shifted (D_g ≻ 0): z_g = 0
        # must force all of W_g to zero. Dead channels (no columns) count as unshifted.
        self.shifted = (low > T_MIN) & (np.bincount(g, minlength=C) > 0)
        self.t = np.where(self.shifted, low, 0.0)   # per channel: the smallest eigenvalue of D_g
        self.tc = np.where(self.shifted[g], tc, 0.0)   # shift of every whitened column
        self.c = w.target_sq
        self.C = w.n_channels
        self.solves = 0
        self._recent: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (W, T, ridge) of recent solves

    def __getstate__(self):
        return {**self.__dict__, "_recent": []}     # (a cache: not worth sending to a worker process)

    def forget(self) -> None:
        """Drop the cached recent solves (two r×m weights) that :meth:`dual` reuses."""
        self._recent = []

    def solve(self, z: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, float]:
        """Relaxed weights ``W(z)`` (r×m) and value ``F(z)`` (energy) at ``z`` in [0, 1]^C.

        Columns of channels in ``out`` or with ``z_g = 0`` (shifted channels only) are dropped; the
        others get the ridge ``t_g (1/z_g − 1)``: ``(M_TT + ridge) W_T = B_T``.
        """
        z = np.where(self.shifted, z, 1.0)
        z = np.where(out, 0.0, z)
        zc = z[self.w.col_group]
        T = zc > 0
        if not T.any():
            return np.zeros_like(self.w.B), self.c
        ridge = self.tc[T] * (1.0 / zc[T] - 1.0)
        idx = np.flatnonzero(T)
        try:
            # (M_TT + ridge gathered and factored in place, in panels past panel_threshold: half a |T|×|T|; B_T
            # solved in its own memory, gathered in the order the factor's solve works in)
            WT = solve_gathered(factor_principal(self.w.M, idx, ridge, lower=False), self.w.B, idx)
        except (np.linalg.LinAlgError, ValueError):
            A = self.w.M[np.ix_(T, T)]
            A[np.diag_indices_from(A)] += ridge
            WT = scipy.linalg.lstsq(A, self.w.B[T], cond=1e-12, check_finite=False)[0]
            del A
        # (the energy before the r×m weights exist, its product written over a fresh B_T: at most two |T|×m at a
        # time beside the factor where B_T, the solve's copy, the weights and the product were four; the same sum,
        # bit for bit)
        BT = self.w.B[T]
        energy = float(self.c - np.sum(np.multiply(WT, BT, out=BT)))
        del BT
        W = np.zeros_like(self.w.B)
        W[T] = WT
        del WT
        self._recent = [(W, T, ridge)] + self._recent[:1]
        self.solves += 1
        return W, energy

    def release(self, W: np.ndarray) -> None:
        """Drop ``W`` (from :meth:`solve`) from the cached recent solves once its dual is taken: an r×m freed
        before the next solve allocates another."""
        self._recent = [entry for entry in self._recent if entry[0] is not W]

    def dual(self, W: np.ndarray) -> tuple[float, np.ndarray]:
        """``(L, a)`` of the minorant ``F(z) >= L − Σ_g a_g z_g`` given by ``W`` (from :meth:`solve`).

        For a ``W`` just returned by :meth:`solve`, ``(M W)_T = B_T − ridge·W_T`` saves the product
        on the solved columns: only the others need ``M_NT W_T``.
        """
        for Wr, T, ridge in self._recent:
            if Wr is W:
                return self._dual_solved(W, T, ridge)
        L, a, _ = self.minorant(W, self.shifted_product(W))
        return L, a

    @property
    def covers_all(self) -> bool:
        """Whether every channel with columns is shifted: what :meth:`minorant` of arbitrary weights (and a block
        shift search) needs."""
        return bool(np.all(self.shifted | (np.diff(self.w.starts) == 0)))

    def minorant(self, W: np.ndarray, QW: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(L, a, V)`` of the minorant given by *any* ``W`` (r×m) with ``QW = (M − T) W`` given: valid
        only when every channel with columns is shifted (an unshifted channel's ``a_g = 0`` needs ``V_g = 0``,
        which only :meth:`solve`'s weights guarantee)."""
        V = self.w.B - QW
        L = self.c - float(np.vdot(W, QW))
        return L, self._coefficients(V), V

    def shifted_product(self, W: np.ndarray) -> np.ndarray:
        """``(M − T) W`` (r×m), using only ``W``'s nonzero rows while they are at most half of them (past that
        the gathered ``M[:, T]`` costs more than the zero rows' products: at C = 11,008 it was an r×r copy)."""
        T = np.flatnonzero(np.any(W != 0, axis=1))
        out = self.w.M @ W if 2 * T.size > W.shape[0] else gathered_product(self.w.M, slice(None), T, W[T])
        step = max(1, SHIFT_BLOCK_ENTRIES // max(W.shape[1], 1))
        for i in range(0, W.shape[0], step):              # (out −= T W a block of rows at a time: no r×m temporary)
            out[i:i + step] -= self.tc[i:i + step, None] * W[i:i + step]
        return out

    def _dual_solved(self, W, T, ridge):
        # (no r×m residual: its squared row norms are taken on the solved rows, then on the others a block of
        # rows at a time past DUAL_BLOCK_ENTRIES gathered entries; one block below, bit for bit as one V was)
        WT = W[T]
        VT = (ridge + self.tc[T])[:, None] * WT                  # B_T − (Q W)_T
        rest = self.w.B[T]
        rest -= VT                                               # (Q W)_T
        L = self.c - float(np.sum(np.multiply(WT, rest, out=rest)))   # ⟨W, QW⟩
        del rest
        rowsq = np.zeros(W.shape[0])
        rowsq[T] = np.sum(np.multiply(VT, VT, out=VT), axis=1)
        del VT
        N = np.flatnonzero(~T)
        step = max(1, N.size if N.size * WT.shape[0] <= DUAL_BLOCK_ENTRIES else DUAL_BLOCK_ENTRIES // WT.shape[0])
        for lo in range(0, N.size, step):
            rows = N[lo:lo + step]
            VN = self.w.B[rows]
            VN -= gathered_product(self.w.M, rows, T, WT)       # (lazy Grams: in row blocks of their own)
            rowsq[rows] = np.sum(np.multiply(VN, VN, out=VN), axis=1)
        return L, self._coefficients_of_rows(rowsq)

    def _coefficients(self, V: np.ndarray) -> np.ndarray:
        """The minorant's ``a_g = Σ_{j∈g, t_j>0} ‖V_j‖² / t_j`` (C,) from its residual cross ``V`` (r×m)."""
        # (row sums of V∘V: one r×m temporary where V[sh] made three; the same sums, bit for bit)
        return self._coefficients_of_rows(np.sum(V * V, axis=1))

    def _coefficients_of_rows(self, rowsq: np.ndarray) -> np.ndarray:
        """:meth:`_coefficients` from the squared row norms ``‖V_j‖²`` (r,)."""
        sh = self.tc > 0
        per_col = np.where(sh, rowsq / np.where(sh, self.tc, 1.0), 0.0)
        return np.bincount(self.w.col_group, weights=per_col, minlength=self.C)


def _lmo(a: np.ndarray, free: np.ndarray, r: int | None, cap: float | None,
         costs: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximize ``Σ a_g z_g`` over z in [0,1] on ``free`` (0 elsewhere) with ``Σ z <= r``, ``Σ cost·z <= cap``.

    Returns a feasible maximizer-ish point (C,) and an *upper bound* on the maximum (exact with one
    constraint: top-r sum or fractional knapsack; with both, the smaller of the two maxima).
    """
    C = a.size
    idx = np.flatnonzero(free)
    vals = np.maximum(a[idx], 0.0)
    val_r = val_c = math.inf
    z = np.zeros(C)
    if r is not None:
        top = np.argsort(-vals, kind="stable")[:max(r, 0)]
        val_r = float(vals[top].sum())
        z[idx[top]] = 1.0
    if cap is not None:
        c = costs[idx]
        zc = np.zeros(C)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(c > 0, vals / np.where(c > 0, c, 1.0), np.inf)
        left, val = max(cap, 0.0), 0.0
        for j in np.argsort(-ratio, kind="stable"):
            if vals[j] <= 0:
                continue
            take = 1.0 if c[j] <= left else left / c[j]
            if take <= 0:
                break
            zc[idx[j]] = take
            val += take * vals[j]
            left -= take * c[j]
        val_c = val
        if r is None or val_c < val_r:
            z = zc
        # make the point feasible for both constraints
        if r is not None and z.sum() > r:
            z *= r / z.sum()
        spent = float(costs @ z)
        if spent > cap > 0:
            z *= cap / spent
        elif cap <= 0:
            z[costs > 0] = 0.0
    return z, min(val_r, val_c) if (r is not None or cap is not None) else float(vals.sum())


# ===================================================================================== search state
class _Search:
    """What every backend shares: problem, relaxation, incumbent, limits (energies, not ratios)."""

    def __init__(self, problem: SelectionProblem, k: int | None, budget: float | None, rel: Relaxation,
                 deadline: float | None, rel_gap: float):
        self.p, self.k, self.budget, self.rel = problem, k, budget, rel
        self.deadline, self.rel_gap = deadline, rel_gap
        self.costs = problem.costs
        self.c = problem.target_sq
        self.best_mask: np.ndarray | None = None
        self.best_err = math.inf
        self.sources: dict[str, float] = {}
        self.best_source = ""
        self.pruned_min = math.inf            # smallest bound of any subtree discarded by a bound
        self.conditional = False              # node-conditional shifts in the B&B (bound="conditional")
        self.node_shifts = 0

    def prune(self, bound: float) -> None:
        self.pruned_min = min(self.pruned_min, bound)

    def __getstate__(self):
        # what a branch-and-bound worker process gets (the relaxation carries the statistics it needs;
        # the problem and the incumbent stay in the main process)
        state = self.__dict__.copy()
        state.update(p=None, best_mask=None)
        return state

    def timed_out(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def feasible(self, mask: np.ndarray) -> bool:
        return ((self.k is None or int(mask.sum()) <= self.k)
                and (self.budget is None or float(self.costs[mask].sum()) <= self.budget + 1e-9))

    def offer(self, mask: np.ndarray, source: str) -> float:
        """Evaluate a set (energy of its refit error) and keep it if it is the best feasible one."""
        mask = np.asarray(mask, bool)
        if not self.feasible(mask):
            return math.inf
        e = max(self.c - self.rel.w.explained(mask), 0.0)
        if source not in self.sources or e / self.c < self.sources[source]:
            self.sources[source] = e / self.c
        if e < self.best_err - 1e-14 * self.c:
            self.best_err, self.best_mask, self.best_source = e, mask.copy(), source
        return e

    @property
    def threshold(self) -> float:
        """Nodes whose bound reaches this cannot improve the incumbent by more than the gap."""
        return self.best_err * (1.0 - self.rel_gap)

    def limits(self, fixed_in: np.ndarray) -> tuple[int | None, float | None]:
        r = None if self.k is None else self.k - int(fixed_in.sum())
        cap = None if self.budget is None else self.budget - float(self.costs[fixed_in].sum())
        return r, cap

    def bound(self, L: float, a: np.ndarray, fixed_in: np.ndarray, free: np.ndarray) -> tuple[float, np.ndarray]:
        """Node bound (energy) of the minorant ``(L, a)`` and the LMO point (fixed-in channels at 1)."""
        r, cap = self.limits(fixed_in)
        s, top = _lmo(a, free, r, cap, self.costs)
        s[fixed_in] = 1.0
        return L - float(a[fixed_in].sum()) - top, s


def _feasible_start(S: _Search, z0: np.ndarray, fixed_in, fixed_out) -> np.ndarray:
    free = ~(fixed_in | fixed_out)
    z = np.clip(np.asarray(z0, float), 0.0, 1.0).copy()
    z[fixed_in], z[fixed_out] = 1.0, 0.0
    r, cap = S.limits(fixed_in)
    if free.any() and z[free].sum() <= 0:
        z[free] = 0.5
    if r is not None and z[free].sum() > r:
        z[free] *= max(r, 0) / z[free].sum()
    if cap is not None:
        spent = float(S.costs[free] @ z[free])
        if spent > cap:
            z[free] *= max(cap, 0.0) / spent
    return z


def _relax(S: _Search, fixed_in: np.ndarray, fixed_out: np.ndarray, z0: np.ndarray, max_iter: int,
           cuts: list | None = None, converge: bool = False, out: dict | None = None):
    """Frank–Wolfe on ``min F(z)`` over the node's polytope.

    Returns ``(bound, z, L, a)``: the best node bound (energy) seen and the minorant giving it, and
    the last relaxed point. Stops early once the bound prunes the node, or (unless ``converge``, as
    at the root, whose minorant drives reduced-cost fixing and the OA cuts everywhere) once ``F(z)``
    (an upper estimate of the relaxed optimum) shows that the relaxation cannot prune it. ``out["W"]``
    (when given): the weights of the best minorant.
    """
    rel = S.rel
    free = ~(fixed_in | fixed_out)
    z = _feasible_start(S, z0, fixed_in, fixed_out)
    W, Fz = rel.solve(z, fixed_out)
    best = (-math.inf, 0.0, None)
    for it in range(max_iter + FINAL_DUAL):
        L, a = rel.dual(W)
        if cuts is not None:
            cuts.append((L, a))
        lb, s = S.bound(L, a, fixed_in, free)
        if lb > best[0]:
            best = (lb, L, a)
            if out is not None:
                out["W"] = W
        if best[2] is not None and (out is None or out.get("W") is not W):
            rel.release(W)                        # (its dual is taken: not kept beside the next solves' weights)
            W = None
        if (lb >= S.threshold or S.timed_out() or (not converge and it >= 1 and Fz < S.threshold)
                or Fz - lb <= 1e-9 * S.c or it == max_iter):
            break
        d = s - z
        slope = -float(a @ d)                     # directional derivative of F (∂F/∂z_g = −a_g)
        if slope >= 0:
            break
        W1, F1 = rel.solve(s, fixed_out)
        curv = F1 - Fz - slope                    # >= 0 by convexity
        gamma = 1.0 if curv <= 0 else min(1.0, -slope / (2.0 * curv))
        if gamma >= 1.0:
            z, W, Fz = s, W1, F1
            continue
        L1, a1 = rel.dual(W1)
        if cuts is not None:
            cuts.append((L1, a1))
        lb1, _ = S.bound(L1, a1, fixed_in, free)
        if lb1 > best[0]:
            best = (lb1, L1, a1)
            if out is not None:
                out["W"] = W1
        if S.timed_out():                         # (each solve is an uninterruptible factorization)
            break
        zn = z + gamma * d
        Wn, Fn = rel.solve(zn, fixed_out)
        if F1 < Fn:
            zn, Wn, Fn = s, W1, F1
        for _ in range(LINE_BACKTRACKS if converge else 0):
            if Fn < Fz or S.timed_out():
                break
            # the quadratic model overshot (the perspective terms are far from quadratic near z_g = 0):
            # shorter steps along the same direction, which is a descent direction (slope < 0)
            gamma *= 0.25
            zn = z + gamma * d
            Wn, Fn = rel.solve(zn, fixed_out)
        if Fn >= Fz:
            break
        z, W, Fz = zn, Wn, Fn
    if best[2] is None:
        L, a = rel.dual(W)
        lb, _ = S.bound(L, a, fixed_in, free)
        best = (lb, L, a)
        if out is not None:
            out["W"] = W
    rel.forget()            # (the last solves' weights: no use to the next node, an r×m each beside its factor)
    return best[0], z, best[1], best[2]


def _cut_ascent(S: _Search, W: np.ndarray, deadline: float | None, max_steps: int = CUT_MAX_STEPS, *,
                own: bool = False):
    """Raise the root bound by first-order ascent on the minorant's weights, starting from ``W`` (r×m; the
    incumbent's refit weights give its outer-approximation cut). For large layers whose root relaxation does not
    fit the time limit: a step costs one r×r·m product, no factorization.

    The minorant ``L(W) − max_z Σ a_g(W) z_g`` is concave in ``W`` and a valid bound for *every* ``W`` (all
    channels shifted, see :meth:`Relaxation.minorant`), so the ascent only has to find good ones. Its
    stationary points for a fixed ``z`` are the relaxed solves ``(Q + T/z) W = B``, i.e. ``W = Z V / t``: the step
    moves towards that point, with ``z`` the running Frank–Wolfe average of the linear minimization's points, by
    the best length of ``CUT_STEPS_GRID`` (``Q(W + ηD) = QW + η QD``: one product prices them all), taken only
    when it raises the bound. The bound returned is re-evaluated with a fresh product at the last ``W`` (no drift
    of the running ``QW``).

    ``own``: ``W`` is the caller's to give up (updated in place, no copy).

    Returns ``(bound, steps, L, a)``: the bound (energy), the steps taken and the minorant giving the bound.
    """
    rel, C = S.rel, S.rel.C
    nothing, free = np.zeros(C, bool), np.ones(C, bool)
    g = rel.w.col_group
    sh = rel.tc > 0
    inv_t = np.zeros(rel.tc.size)
    inv_t[sh] = 1.0 / rel.tc[sh]
    if not own:
        W = np.array(W, dtype=np.float64)        # (updated in place below: the caller's array is left alone)
    QW = rel.shifted_product(W)
    L, a, V = rel.minorant(W, QW)
    lb, s = S.bound(L, a, nothing, free)
    WQW, VV = float(np.vdot(W, QW)), _row_norms_sq(V)
    zbar, steps, pace = None, 0, 0.0
    for it in range(max_steps):
        if lb >= S.threshold or (deadline is not None and time.perf_counter() + 2.0 * pace > deadline):
            break
        t0 = time.perf_counter()
        zbar = s if zbar is None else zbar + 2.0 / (it + 2.0) * (s - zbar)
        D = (zbar[g] * inv_t)[:, None] * V
        D -= W
        QD = rel.shifted_product(D)
        # the minorant along W + ηD in closed form: L(η) = c − ⟨W + ηD, QW + ηQD⟩ and, row by row,
        # ‖V − η·QD‖² = ‖V‖² − 2η⟨V, QD⟩ + η²‖QD‖² (no r×m array per trial step; the bound returned is re-evaluated
        # from W itself at the end)
        cross_wd = float(np.vdot(W, QD)) + float(np.vdot(D, QW))
        dqd = float(np.vdot(D, QD))
        vq, qq = np.einsum("ij,ij->i", V, QD), _row_norms_sq(QD)
        found = None
        for eta in CUT_STEPS_GRID:
            L1 = rel.c - (WQW + eta * cross_wd + eta * eta * dqd)
            per_col = np.where(sh, np.maximum(VV - 2.0 * eta * vq + eta * eta * qq, 0.0) * inv_t, 0.0)
            a1 = np.bincount(g, weights=per_col, minlength=C)
            lb1, s1 = S.bound(L1, a1, nothing, free)
            if lb1 > lb and (found is None or lb1 > found[0]):
                found = (lb1, eta, s1)
        pace = time.perf_counter() - t0
        if found is None:
            break
        lb, eta, s = found                 # (a step is taken only when it raises the bound: W is the best point)
        W += eta * D
        QW += eta * QD
        V -= eta * QD
        del D, QD
        WQW, VV = float(np.vdot(W, QW)), _row_norms_sq(V)
        steps += 1
    L, a, _ = rel.minorant(W, rel.shifted_product(W))
    lb, _ = S.bound(L, a, nothing, free)
    return lb, steps, L, a


def _row_norms_sq(X: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", X, X)


def _measured_flop_rate(n: int) -> float:
    """Flop/s of one n×n Cholesky factorization on this machine now (its BLAS threads and load as they are): the
    ascent's fallback (:func:`_cut_ascent`) decides with it whether its factorizations fit; ``FLOP_RATE`` stays
    the conservative figure of every other decision. (Larger factorizations run faster: measured on the 2-core
    CPU with 2 threads, 31 GFLOP/s at n = 2,048, 41 at 3,072, 43 at 11,008.)"""
    best = math.inf
    for _ in range(2):      # (the best of two: the first also wakes the BLAS threads, 33 against 38 GFLOP/s here)
        A = np.full((n, n), 0.1, order="F")     # (LAPACK's own order: a C-ordered one times a transposing copy too)
        A[np.diag_indices(n)] += 1.0
        t0 = time.perf_counter()
        scipy.linalg.cholesky(A, lower=True, overwrite_a=True, check_finite=False)
        best = min(best, time.perf_counter() - t0)
    return max(n ** 3 / 3.0 / max(best, 1e-9), 1.0)


# ===================================================================================== incumbents
def _affordable(r: int, factorizations: float, deadline: float | None, rate: float | None = None) -> bool:
    """Whether ``factorizations`` Cholesky factorizations of an r×r matrix (r³/3 flops each, at
    ``rate``, default ``FLOP_RATE``) fit before ``deadline``: none of them can be interrupted once started."""
    rate = FLOP_RATE if rate is None else rate
    return deadline is None or factorizations * r ** 3 / 3.0 / rate < deadline - time.perf_counter()


def _warm_start(S: _Search, w: Whitened, use_lasso: bool, until: float | None = None) -> None:
    """Greedy forward / backward, 1-swap local search from each (the better first), then LASSO (cardinality only)
    and swaps from its set, all stopped at ``until`` (``time.perf_counter``; the bound needs the rest of
    the time limit)."""
    saved = S.deadline
    if until is not None:
        S.deadline = until if saved is None else min(saved, until)
    try:
        _warm_start_heuristics(S, w, use_lasso)
    finally:
        S.deadline = saved


def _warm_start_heuristics(S: _Search, w: Whitened, use_lasso: bool) -> None:
    p, k, budget = S.p, S.k, S.budget
    m = forward_mask(p, k, budget, w=w, deadline=S.deadline)
    starts = [(S.offer(m, "greedy"), m)]
    # backward starts with an r×r inverse that no deadline can interrupt: skip it when that alone
    # would overrun the warm start, and where that inverse would double the memory (a Gram read lazily, or past
    # BACKWARD_START_MAX_COLUMNS: forward selection and swaps then give the incumbent; on 12 population layers of
    # 1,200–1,500 channels forward + swaps matched backward + swaps on every one)
    lazy = isinstance(w.M, ScaledGram)          # (one column per channel past LAZY_MIN_CHANNELS, or a BlockGram)
    if not S.timed_out() and backward_start_fits(w) and _affordable(w.M.shape[0], 3.0, S.deadline):
        m = backward_mask(p, k, budget, w=w, deadline=S.deadline)
        e = S.offer(m, "backward")
        if not np.array_equal(m, starts[0][1]):
            starts.append((e, m))
    # Swaps from every start, the better first, and before LASSO: swap search ends in a local optimum that depends on
    # its start, and under a short limit LASSO took the warm start's whole share. On a trained LLaMA's 688-neuron MLP
    # sites (session 22) swaps from greedy's set beat those from backward's by 0.8 % on one site, swaps from LASSO's
    # by 0.5 % on another; at 5 s the incumbents had been backward's sets, up to 7.9 % above swap's.
    for e, m in sorted(starts, key=lambda s: s[0]):
        if math.isfinite(e):
            _offer_swaps(S, w, m)
    # (LASSO builds its own C×C channel Gram: past LASSO_WARM_MAX_CHANNELS that doubles the memory, and for a Gram read
    # lazily (one column per channel past LAZY_MIN_CHANNELS) it is a second copy of the statistics; for a BlockGram
    # its group problem's own arrays took exact's warm start to 1.13× the statistics at C = 1,024 3×3, session 32,
    # where swaps from greedy's set reach the same incumbent)
    if use_lasso and budget is None and not S.timed_out() and p.n_channels < LASSO_WARM_MAX_CHANNELS and not lazy:
        try:
            from solvers.selection.lasso import select_lasso

            left = None if S.deadline is None else max(S.deadline - time.perf_counter(), 0.1)
            m = np.asarray(select_lasso(p, k=k, time_limit=left).mask, bool)
        except Exception:  # LASSO is only a warm start: a missing cvxpy solver must not stop us
            m = None
        if m is not None and math.isfinite(S.offer(m, "lasso")):
            _offer_swaps(S, w, m)


def _offer_swaps(S: _Search, w: Whitened, start: np.ndarray | None = None) -> None:
    """1-swap local search from ``start`` (default: the incumbent) until ``S.deadline``; it starts from an s×s
    inverse of the kept columns (uninterruptible): only when that fits."""
    start = S.best_mask if start is None else start
    if (not S.timed_out() and start is not None
            and _affordable(int(w.col_mask(start).sum()), 3.0, S.deadline)):
        S.offer(improve_by_swaps(S.p, start, budget=S.budget, deadline=S.deadline, w=w), "swap")


def _enumerate(S: _Search, w: Whitened, k: int) -> float | None:
    """Evaluate every set of exactly ``k`` channels (the refit error never grows with more channels, so
    the optimum under ``|S| <= k`` is among them), in batches of stacked ``M_SS`` solves.

    Offers the best set to ``S`` and returns the smallest error found (energy, lowered by the
    batched solves' round-off allowance ``ENUMERATE_SAFETY``·‖Y‖²), or None when the deadline stopped it.
    """
    C = w.n_channels
    sizes = np.diff(w.starts)
    combos = np.array(list(itertools.combinations(range(C), k)), dtype=np.int64).reshape(-1, k)
    best_e, best_i = math.inf, -1
    # channels with fewer whitened columns (rank-deficient or dead) are padded to q columns that
    # contribute nothing (identity rows, zero cross)
    q = max(int(sizes.max()), 1) if sizes.size else 1
    pad_idx = np.minimum(w.starts[:-1, None] + np.arange(q)[None, :], max(w.M.shape[0] - 1, 0))
    pad = np.arange(q)[None, :] >= sizes[:, None]                 # (C, q)
    uniform = w.M.shape[0] > 0
    # no set explains more than all channels together, none less than nothing: a batched value
    # outside [err(all), ‖Y‖²] is round-off on a near-singular M_SS, re-done by exact refits
    low, high = (S.c - w.explained(np.ones(C, bool))) - 1e-9 * S.c, S.c * (1 + 1e-9)
    # round-off of the batched solves, relative to ‖Y‖²: ~ε·cond(M_SS) <= ε·C/λ_min(M) (unit blocks)
    # (an eigenvalue solve only where it is cheap next to the enumeration; else the coarse allowance)
    lam = _lambda_min(w.M) if w.M.shape[0] <= 1500 else 0.0
    safety = ENUMERATE_SAFETY + 1e-15 * C / max(lam, 1e-300) if lam > 0 else 1e-9
    for lo in range(0, combos.shape[0], ENUMERATE_BATCH):
        if S.timed_out():
            if best_i >= 0:                              # out of time: the best set so far still counts
                mask = np.zeros(C, bool)
                mask[combos[best_i]] = True
                S.offer(mask, "enumeration")
            return None
        part = combos[lo:lo + ENUMERATE_BATCH]
        energies = None
        if uniform:
            cols = pad_idx[part].reshape(part.shape[0], k * q)
            padded = pad[part].reshape(part.shape[0], k * q)
            Mb = w.M[cols[:, :, None], cols[:, None, :]]
            Bb = w.B[cols]
            if padded.any():
                Mb[padded[:, :, None] | padded[:, None, :]] = 0.0
                Mb[padded[:, :, None] & np.eye(k * q, dtype=bool)[None]] = 1.0
                Bb[padded] = 0.0
            try:
                energies = S.c - np.sum(Bb * np.linalg.solve(Mb, Bb), axis=(1, 2))
                if not (np.all(np.isfinite(energies)) and np.all(energies >= low) and np.all(energies <= high)):
                    energies = None
            except np.linalg.LinAlgError:       # a singular M_SS in the batch: exact refits one by one
                energies = None
        if energies is None:
            energies = np.empty(part.shape[0])
            for j, chosen in enumerate(part):
                mask = np.zeros(C, bool)
                mask[chosen] = True
                energies[j] = S.c - w.explained(mask)
        j = int(np.argmin(energies))
        if energies[j] < best_e:
            best_e, best_i = float(energies[j]), lo + j
    mask = np.zeros(C, bool)
    mask[combos[best_i]] = True
    e = S.offer(mask, "enumeration")
    if abs(e - best_e) > max(safety, 1e-9) * S.c:     # the batched and the exact refit disagree: no proof
        return None
    return max(min(best_e, e) - safety * S.c, 0.0)


def _round(S: _Search, z: np.ndarray, a: np.ndarray, fixed_in, fixed_out) -> np.ndarray:
    """A feasible set from a relaxed point: fixed-in channels, then free ones by z (then a) while they fit."""
    mask = fixed_in.copy()
    free = np.flatnonzero(~(fixed_in | fixed_out))
    order = free[np.lexsort((-a[free], -z[free]))]
    r, cap = S.limits(fixed_in)
    for g in order:
        if r is not None and r <= 0:
            break
        if cap is not None and S.costs[g] > cap + 1e-9:
            continue
        mask[g] = True
        if r is not None:
            r -= 1
        if cap is not None:
            cap -= S.costs[g]
    return mask


# ===================================================================================== backends
@dataclass(order=True)
class _Node:
    bound: float
    neg_depth: int
    seq: int
    fixed_in: np.ndarray = None  # type: ignore[assignment]
    fixed_out: np.ndarray = None  # type: ignore[assignment]
    z: np.ndarray = None  # type: ignore[assignment]
    tc: np.ndarray | None = None   # node-conditional shifts certified at the parent (None: the root's)


def _fix_by_reduced_cost(S: _Search, L: float, a: np.ndarray, fixed_in: np.ndarray, fixed_out: np.ndarray,
                         ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[float, float]]]:
    """Fix free channels whose other branch the minorant ``(L, a)`` already prunes.

    Returns the new fixings and, per remaining free channel, the (in, out) child bounds.
    """
    fixed_in, fixed_out = fixed_in.copy(), fixed_out.copy()
    if S.budget is None:
        return _fix_cardinality(S, L, a, fixed_in, fixed_out)
    child: dict[int, tuple[float, float]] = {}
    changed = True
    while changed:
        changed = False
        child.clear()
        free = ~(fixed_in | fixed_out)
        for g in np.flatnonzero(free):
            fin = fixed_in.copy()
            fin[g] = True
            f2 = free.copy()
            f2[g] = False
            r, cap = S.limits(fin)
            b_in = (-math.inf if (r is not None and r < 0) or (cap is not None and cap < -1e-9)
                    else S.bound(L, a, fin, f2)[0])
            b_out = S.bound(L, a, fixed_in, f2)[0]
            if b_in == -math.inf or b_in >= S.threshold:
                fixed_out[g] = True
                changed = True
                if b_in > -math.inf:             # (-inf: the child is infeasible, nothing pruned)
                    S.prune(b_in)
            elif b_out >= S.threshold:
                fixed_in[g] = True
                changed = True
                S.prune(b_out)
            else:
                child[g] = (b_in, b_out)
            if changed:
                break
    return fixed_in, fixed_out, child


def _fix_cardinality(S: _Search, L: float, a: np.ndarray, fixed_in: np.ndarray, fixed_out: np.ndarray):
    """Vectorized :func:`_fix_by_reduced_cost` for ``|S| <= k`` alone: child bounds are top-r sums.

    With ``v`` the free ``a`` values sorted, ``T_r`` the top-r sum: forcing a top-r channel out costs
    ``v_{r+1}`` instead of it, forcing another channel in displaces ``v_r``. Fixings found together
    are all valid (each prunes a branch of the node, hence of any sub-node).
    """
    while True:
        free = ~(fixed_in | fixed_out)
        idx = np.flatnonzero(free)
        r = S.k - int(fixed_in.sum())
        if idx.size == 0:
            return fixed_in, fixed_out, {}
        if r <= 0:                                  # no room: everything left is out
            fixed_out[idx] = True
            return fixed_in, fixed_out, {}
        v = np.maximum(a[idx], 0.0)
        order = np.argsort(-v, kind="stable")
        rank = np.empty(idx.size, np.int64)
        rank[order] = np.arange(idx.size)
        sv = v[order]
        Tr = float(sv[:r].sum())
        vr = float(sv[r - 1]) if r <= sv.size else 0.0
        vr1 = float(sv[r]) if r < sv.size else 0.0
        base = L - float(a[fixed_in].sum())
        top = rank < r
        b_in = np.where(top, base - Tr, base - v - (Tr - vr))
        b_out = np.where(top, base - (Tr - v + vr1), base - Tr)
        thr = S.threshold
        go_out = b_in >= thr
        go_in = ~go_out & (b_out >= thr)
        if not (go_out.any() or go_in.any()):
            return fixed_in, fixed_out, {int(g): (float(bi), float(bo)) for g, bi, bo in zip(idx, b_in, b_out)}
        used = np.r_[b_in[go_out], b_out[go_in]]
        S.prune(float(used.min()))
        fixed_out[idx[go_out]] = True
        fixed_in[idx[go_in]] = True


def _node_relax(S: _Search, fin: np.ndarray, fout: np.ndarray, z0: np.ndarray, max_iter: int,
                tc_parent: np.ndarray | None):
    """:func:`_relax` at a node, and the per-column shifts it used (None: the root's).

    With ``S.conditional`` the node gets node-conditional shifts (:mod:`solvers.selection.conditional`:
    no shift on fixed-in channels, fixed-out columns out of ``M − D ⪰ 0``, the free columns' shift
    raised as far as a Cholesky factor certifies). They start from the parent's, which stay valid
    in every descendant (zeroing a fixed channel's shift, or dropping its columns, keeps
    ``M_TT − D_T ⪰ 0``), so the shifts grow down the tree.
    """
    root = S.rel
    tc = tc_parent
    if S.conditional and (fin.any() or fout.any()):
        w = root.w
        keep = int((~fout[w.col_group]).sum())
        if _affordable(keep, 2.5, S.deadline):
            out = node_shift(w.M, w.col_group, root.tc if tc_parent is None else tc_parent, fin, fout)
            if out is not None and out[1] > 0:
                tc = out[0]
                S.node_shifts += 1
        if tc is not None:
            S.rel = Relaxation(w, np.where((fin | fout)[w.col_group], 0.0, tc))
    try:
        return (*_relax(S, fin, fout, z0, max_iter), tc)
    finally:
        if S.rel is not root:
            root.solves += S.rel.solves
        S.rel = root


def _expand(S: _Search, node: _Node, max_iter: int) -> list[tuple]:
    """Process one open node: a leaf's set is offered; otherwise its relaxation is bounded, and the node
    is pruned, fixed by reduced costs, or branched. Returns its children as
    ``(bound, neg_depth, fixed_in, fixed_out, z, tc)`` (none when it was a leaf or pruned)."""
    fin, fout = node.fixed_in, node.fixed_out
    free = ~(fin | fout)
    r, cap = S.limits(fin)
    # Leaves: nothing left to decide, or everything left fits (monotone: keep it all).
    if not free.any() or (r is not None and r <= 0) or (
            (r is None or free.sum() <= r) and (cap is None or S.costs[free].sum() <= cap + 1e-9)):
        leaf = fin.copy()
        if free.any() and (r is None or r > 0):
            leaf |= free
        S.offer(leaf, "bnb")
        return []
    lb, z, L, a, tc = _node_relax(S, fin, fout, node.z, max_iter, node.tc)
    lb = max(lb, node.bound)
    if lb < S.threshold:
        S.offer(_round(S, z, a, fin, fout), "bnb")
    if lb >= S.threshold:
        S.prune(lb)
        return []
    fin, fout, child = _fix_by_reduced_cost(S, L, a, fin, fout)
    if not child:                          # all fixed: a leaf (or pruned)
        return [(lb, node.neg_depth - 1, fin, fout, z, tc)]
    cand = np.array(sorted(child))
    if BRANCH_RULE == "bound":
        # The child bounds of the parent's minorant are free: branch where the weaker child is
        # strongest (product-rule-like dual "strong branching").
        lo_b = np.array([min(child[g]) for g in cand])
        hi_b = np.array([max(child[g]) for g in cand])
        g = int(cand[np.lexsort((-hi_b, -lo_b))[0]])
    else:
        # Branch on the most fractional free channel (ties: largest a).
        frac = np.minimum(z[cand], 1.0 - z[cand])
        g = int(cand[np.lexsort((-a[cand], -frac))[0]])
    b_in, b_out = child[g]
    children = []
    for to_in, b in ((True, b_in), (False, b_out)):
        ci, co = fin.copy(), fout.copy()
        (ci if to_in else co)[g] = True
        zc = z.copy()
        zc[g] = 1.0 if to_in else 0.0
        children.append((max(lb, b), node.neg_depth - 1, ci, co, zc, tc))
    return children


# --- parallel branch and bound: worker processes bound the best open nodes while the main process keeps
# the heap and the incumbent. Processes, not BLAS threads: a second BLAS thread bought 8 % more nodes at
# C = 256 3×3 (339 against 313 in 300 s); the node's work is mostly factorizations of a few hundred to a
# few thousand columns, where two threads barely overlap.
_WORKER: dict = {}


def _worker_init(state) -> None:
    """``state``: the search, pickled with its large arrays in shared memory (:class:`SharedPickle`'s bytes)."""
    import pickle

    from solvers.selection.linalg import one_blas_thread

    try:
        _WORKER["search"] = pickle.loads(state)
    except FileNotFoundError:
        # (started after the search ended and its segments were removed: shutdown cancelled every task it could get)
        _WORKER["search"] = None
    _WORKER["blas"] = one_blas_thread()      # (applied on construction; kept for the process's life)


def _worker_expand(node: _Node, best_err: float, seconds_left: float | None, max_iter: int):
    """:func:`_expand` in a worker against the main process's incumbent error at submission (a stale one is
    only higher: fewer prunings, never a wrong one). Returns the children and what the node changed."""
    S = _WORKER["search"]
    S.best_err, S.best_mask, S.best_source, S.sources = best_err, None, "", {}
    S.pruned_min, S.node_shifts = math.inf, 0
    S.deadline = None if seconds_left is None else time.perf_counter() + seconds_left
    solves = S.rel.solves
    children = _expand(S, node, max_iter)
    return (children, S.best_mask, S.best_err, S.best_source, S.sources, S.pruned_min, S.node_shifts,
            S.rel.solves - solves)


def _bnb_parallel(S: _Search, root_z: np.ndarray, max_iter: int, workers: int) -> tuple[float, int]:
    """:func:`_bnb` with ``workers`` processes (spawned: forking a process whose BLAS runs threads can
    deadlock), each on one BLAS thread. The relaxation's large arrays reach them through shared memory, mapped
    read-only by all (:mod:`solvers.selection.shared_arrays`; where ``/dev/shm`` lacks room, each worker unpickles
    a copy of its own)."""
    import concurrent.futures as cf
    import multiprocessing

    from solvers.selection.shared_arrays import SharedPickle

    C = S.p.n_channels
    seq = itertools.count()
    heap = [_Node(-math.inf, 0, next(seq), np.zeros(C, bool), np.zeros(C, bool), root_z)]
    running: dict = {}
    nodes = 0
    # (the segments are removed on leaving: workers that mapped the arrays keep their mappings until they exit)
    with SharedPickle(S) as shared:
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_worker_init, initargs=(shared.data,))
        try:
            while (heap or running) and not S.timed_out():
                while heap and len(running) < workers and heap[0].bound < S.threshold:
                    node = heapq.heappop(heap)
                    nodes += 1
                    left = None if S.deadline is None else S.deadline - time.perf_counter()
                    running[pool.submit(_worker_expand, node, S.best_err, left, max_iter)] = node
                if not running:                   # every open node is pruned: the incumbent is optimal
                    break
                wait = None if S.deadline is None else max(S.deadline - time.perf_counter(), 0.0)
                done, _ = cf.wait(running, timeout=wait, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    running.pop(f)
                    children, mask, err, source, sources, pruned, shifts, solves = f.result()
                    if mask is not None and err < S.best_err - 1e-14 * S.c:
                        S.best_err, S.best_mask, S.best_source = err, mask, source
                    for src, e in sources.items():
                        S.sources[src] = min(e, S.sources.get(src, math.inf))
                    S.pruned_min = min(S.pruned_min, pruned)
                    S.node_shifts += shifts
                    S.rel.solves += solves
                    for ch in children:
                        heapq.heappush(heap, _Node(ch[0], ch[1], next(seq), *ch[2:]))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    # nodes still in the heap or in a worker are open: the bound is their smallest
    open_bounds = [n.bound for n in heap] + [n.bound for n in running.values()]
    return min([*open_bounds, S.pruned_min, S.best_err]), nodes


def _bnb(S: _Search, root_z: np.ndarray, max_iter: int, workers: int = 1) -> tuple[float, int]:
    """Best-first branch and bound. Returns (proven lower bound in energy, nodes processed)."""
    if workers > 1:
        return _bnb_parallel(S, root_z, max_iter, workers)
    C = S.p.n_channels
    seq = itertools.count()
    heap = [_Node(-math.inf, 0, next(seq), np.zeros(C, bool), np.zeros(C, bool), root_z)]
    nodes = 0
    while heap:
        if heap[0].bound >= S.threshold:      # every open node is pruned: incumbent is optimal
            return min(heap[0].bound, S.pruned_min, S.best_err), nodes
        if S.timed_out():
            return min(heap[0].bound, S.pruned_min, S.best_err), nodes
        node = heapq.heappop(heap)
        nodes += 1
        for ch in _expand(S, node, max_iter):
            heapq.heappush(heap, _Node(ch[0], ch[1], next(seq), *ch[2:]))
    return min(S.pruned_min, S.best_err), nodes


# The OA masters measure η in units of the first incumbent's error (``unit``, energy), so that η is
# O(1) and the solvers' absolute feasibility tolerances (1e-9 here) are relative ones.
def _oa_cut_rows(cuts, unit: float) -> list[tuple[float, np.ndarray]]:
    """Cuts ``η >= (L − a·z)/unit``: (constant, coefficients a/unit of z)."""
    return [(L / unit, a / unit) for L, a in cuts]


def _hamming_cut(mask: np.ndarray, err: float, floor: float) -> tuple[float, np.ndarray]:
    """``η >= err − (err − floor)·Hamming(z, mask)`` (η units): tight at ``mask``, slack elsewhere.

    Valid for every set: at another set the right-hand side is at most ``floor``, a global bound.
    """
    drop = err - floor
    # Hamming = Σ_{i∈S}(1 − z_i) + Σ_{i∉S} z_i  ->  η >= err − drop·|S| + Σ_{i∈S} drop·z_i − Σ_{i∉S} drop·z_i
    coef = np.where(mask, drop, -drop)
    return err - drop * float(mask.sum()), -coef        # written as η >= const − Σ a_i z_i with a = −coef


def _highs_oa(S: _Search, root_cuts, floor_energy: float, max_iter: int) -> tuple[float, int, bool]:
    """Multi-tree outer approximation with a HiGHS MILP master.

    Returns (bound in energy, master solves, stalled) — ``stalled`` when the master keeps proposing
    evaluated sets without closing the gap (numerical tolerance), which ends the loop.
    """
    import highspy

    C = S.p.n_channels
    unit = max(S.best_err, 1e-12 * S.c)
    floor = floor_energy / unit
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", S.rel_gap / 4)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    # columns: z_0..z_{C-1} (binary), η
    h.addVars(C + 1, np.zeros(C + 1), np.r_[np.ones(C), inf])
    h.changeColsIntegrality(C, np.arange(C, dtype=np.int32),
                            np.full(C, highspy.HighsVarType.kInteger))
    h.changeColsCost(1, np.array([C], dtype=np.int32), np.array([1.0]))
    h.changeColsBounds(1, np.array([C], dtype=np.int32), np.array([floor]), np.array([inf]))
    idx = np.arange(C, dtype=np.int32)
    if S.k is not None:
        h.addRow(-inf, S.k, C, idx, np.ones(C))
    if S.budget is not None:
        h.addRow(-inf, S.budget, C, idx, S.costs.astype(float))

    def add_cut(const: float, a: np.ndarray) -> None:
        # η + Σ a_i z_i >= const
        nz = np.flatnonzero(a != 0)
        h.addRow(const, inf, nz.size + 1, np.r_[nz, C].astype(np.int32), np.r_[a[nz], 1.0])

    for const, a in _oa_cut_rows(root_cuts, unit):
        add_cut(const, a)
    seen: set[bytes] = set()
    if S.best_mask is not None:
        add_cut(*_hamming_cut(S.best_mask, S.best_err / unit, floor))
        seen.add(S.best_mask.tobytes())
    bound = floor_energy
    it = 0
    stalled = False
    while it < max_iter:
        it += 1
        left = None if S.deadline is None else S.deadline - time.perf_counter()
        if left is not None and left <= 0:
            break
        if left is not None:
            h.setOptionValue("time_limit", max(left, 0.01))
        if S.best_mask is not None:
            h.setOptionValue("objective_bound", S.best_err / unit)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        if status == highspy.HighsModelStatus.kOptimal:
            bound = max(bound, min(info.mip_dual_bound, info.objective_function_value) * unit)
        elif status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt):
            if math.isfinite(info.mip_dual_bound):
                bound = max(bound, info.mip_dual_bound * unit)
            break
        elif status == highspy.HighsModelStatus.kInfeasible:
            # objective_bound cut everything off: nothing beats the incumbent
            bound = max(bound, S.best_err)
            break
        else:
            raise SolverError(f"HiGHS master must solve to optimality or a limit; got {h.modelStatusToString(status)}")
        if bound >= S.threshold:
            break
        sol = np.asarray(h.getSolution().col_value)
        zt = sol[:C] > 0.5
        key = zt.tobytes()
        if key in seen:        # its exact value is already enforced: only round-off keeps η below it
            stalled = True
            break
        e = S.offer(zt, "highs")
        W, _ = S.rel.solve(zt.astype(float), ~zt)
        L, a = S.rel.dual(W)
        add_cut(L / unit, a / unit)
        add_cut(*_hamming_cut(zt, e / unit, floor))
        seen.add(key)
    return min(bound, S.best_err), it, stalled


def _scip_oa(S: _Search, root_cuts, floor_energy: float) -> tuple[float, int]:
    """Single-tree outer approximation in SCIP: the cuts are separated lazily by a constraint handler."""
    from pyscipopt import SCIP_RESULT, Conshdlr, Model, quicksum

    C = S.p.n_channels
    unit = max(S.best_err, 1e-12 * S.c)
    floor = floor_energy / unit
    model = Model()
    model.hideOutput()
    model.setParam("limits/gap", S.rel_gap / 4)
    model.setParam("numerics/feastol", 1e-9)
    z = [model.addVar(vtype="B", name=f"z{i}") for i in range(C)]
    eta = model.addVar(lb=floor, ub=S.c / unit, name="eta")
    model.setObjective(eta, "minimize")
    if S.k is not None:
        model.addCons(quicksum(z) <= S.k)
    if S.budget is not None:
        model.addCons(quicksum(float(S.costs[i]) * z[i] for i in range(C)) <= S.budget)
    for const, a in _oa_cut_rows(root_cuts, unit):
        model.addCons(eta + quicksum(float(a[i]) * z[i] for i in np.flatnonzero(a)) >= const)
    seen: set[bytes] = set()
    tol = 1e-9

    def cuts_at(zv: np.ndarray, binary: bool) -> list[tuple[float, np.ndarray]]:
        out = []
        mask = zv > 0.5
        zz = mask.astype(float) if binary else np.clip(zv, 0.0, 1.0)
        W, _ = S.rel.solve(zz, zz <= 0)
        L, a = S.rel.dual(W)
        out.append((L / unit, a / unit))
        if binary and mask.tobytes() not in seen:
            e = S.offer(mask, "scip")
            seen.add(mask.tobytes())
            out.append(_hamming_cut(mask, e / unit, floor))
        return out

    class OACuts(Conshdlr):
        def _violated(self, sol, binary):
            zv = np.array([self.model.getSolVal(sol, v) for v in z])
            ev = self.model.getSolVal(sol, eta)
            added = False
            for const, a in cuts_at(zv, binary):
                if const - float(a @ zv) > ev + tol:
                    self.model.addCons(eta + quicksum(float(a[i]) * z[i] for i in np.flatnonzero(a)) >= const,
                                       removable=False)
                    added = True
            return added

        def conscheck(self, constraints, solution, checkintegrality, checklprows, printreason, completely):
            zv = np.array([self.model.getSolVal(solution, v) for v in z])
            mask = zv > 0.5
            if not S.feasible(mask):
                return {"result": SCIP_RESULT.INFEASIBLE}
            e = S.offer(mask, "scip") / unit
            if self.model.getSolVal(solution, eta) + tol < e:
                return {"result": SCIP_RESULT.INFEASIBLE}
            return {"result": SCIP_RESULT.FEASIBLE}

        def consenfolp(self, constraints, nusefulconss, solinfeasible):
            if S.timed_out():
                self.model.interruptSolve()
            if self._violated(None, True):
                return {"result": SCIP_RESULT.CONSADDED}
            return {"result": SCIP_RESULT.FEASIBLE}

        def consenfops(self, constraints, nusefulconss, solinfeasible, objinfeasible):
            if self._violated(None, True):
                return {"result": SCIP_RESULT.CONSADDED}
            return {"result": SCIP_RESULT.FEASIBLE}

        def conssepalp(self, constraints, nusefulconss):
            if S.timed_out():
                return {"result": SCIP_RESULT.DIDNOTRUN}
            if self._violated(None, False):
                return {"result": SCIP_RESULT.CONSADDED}
            return {"result": SCIP_RESULT.DIDNOTFIND}

        def conslock(self, constraint, locktype, nlockspos, nlocksneg):
            self.model.addVarLocks(eta, nlockspos, nlocksneg)
            for v in z:
                self.model.addVarLocks(v, nlockspos + nlocksneg, nlockspos + nlocksneg)

    hdlr = OACuts()
    model.includeConshdlr(hdlr, "perspective_oa", "perspective outer-approximation cuts",
                          sepapriority=1, enfopriority=-1, chckpriority=-1, sepafreq=1, propfreq=-1,
                          eagerfreq=-1, maxprerounds=0, delaysepa=False, delayprop=False,
                          needscons=True)
    cons = model.createCons(hdlr, "oa", initial=True, separate=True, enforce=True, check=True,
                            propagate=False, local=False, modifiable=False, dynamic=False,
                            removable=False, stickingatnode=False)
    model.addPyCons(cons)
    if S.best_mask is not None:
        const, a = _hamming_cut(S.best_mask, S.best_err / unit, floor)
        model.addCons(eta + quicksum(float(a[i]) * z[i] for i in range(C)) >= const)
        seen.add(S.best_mask.tobytes())
        sol = model.createSol()
        for i in range(C):
            model.setSolVal(sol, z[i], float(S.best_mask[i]))
        model.setSolVal(sol, eta, S.best_err / unit)
        model.addSol(sol, free=True)
    if S.deadline is not None:
        model.setParam("limits/time", max(S.deadline - time.perf_counter(), 0.01))
    model.optimize()
    bound = model.getDualbound()
    status = model.getStatus()
    if status == "infeasible":
        bound = S.best_err / unit
    if not math.isfinite(bound):
        bound = floor
    return min(bound * unit, S.best_err), int(model.getNNodes())


def _block_shift(S: _Search, w: Whitened, t: np.ndarray, stop: float | None, iterations: int, D_init=None):
    """Block shifts climbing the root relaxation (see :func:`solvers.selection.perspective.optimize_shift`),
    from the scalar shifts ``t`` or from the blocks ``D_init``.

    Returns ``(D, trace)`` with ``D`` None when nothing beat the first value.
    """
    C = w.n_channels
    nothing = np.zeros(C, bool)
    saved_rel, saved_deadline = S.rel, S.deadline
    S.deadline = stop

    def relax_value(wr, d, z):
        S.rel = Relaxation(wr, d)    # (a rotated view of a multi-column group stays a view: see select_exact)
        lb, z, _, _ = _relax(S, nothing, nothing, np.full(C, 0.5) if z is None else z, SHIFT_FW_STEPS,
                             converge=True)
        W, _ = S.rel.solve(z, nothing)
        S.rel = saved_rel            # (no reference to the rotated copy while the next step rotates another)
        return lb, z, W

    try:
        D, out = optimize_shift(w, t, relax_value, iterations=iterations, deadline=stop, D_init=D_init)
    finally:
        S.rel, S.deadline = saved_rel, saved_deadline
    trace = out["trace"]
    return (D if trace and out["best"] > trace[0] else None), trace


def _newton_blocks(S: _Search, w: Whitened, t: np.ndarray, stop: float | None, iterations: int):
    """Block shifts from interior-point sizes (:func:`solvers.selection.perspective.saddle_sizes`).

    1. per-column sizes in each channel's eigenbasis of ``(M⁻¹)_gg``, from ``0.9·t``;
    2. with the time left, the first-order ascent (:func:`_block_shift`'s) from those blocks, for
       better directions, and sizes once more in the ascent's basis (from ``0.97·D``: strictly inside).
    When the sizes' first iteration shows that ``SADDLE_MIN_ITERATIONS`` would not fit before ``stop``,
    the first-order ascent from ``t`` takes the time instead (``info["sizes_gave_up"]``).
    Returns ``(U, d, bound, z, info)`` of the best (valid root bound, energy; -inf / z None when only
    the ascent ran) found, or None when nothing succeeded. Every candidate is feasible (``M − D ⪰ 0``
    checked by Cholesky).
    """
    C = w.n_channels
    nothing = np.zeros(C, bool)
    kw = dict(k=S.k, budget=S.budget, costs=S.costs)

    def bound_of(L, a):
        return S.bound(L, a, nothing, ~nothing)[0]

    t0 = time.perf_counter()
    U = inverse_basis(w)
    wr = rotate(w, U)
    d, val, z, out = saddle_sizes(wr, 0.9 * t[w.col_group], bound_of, deadline=stop,
                                  min_iterations=SADDLE_MIN_ITERATIONS, **kw)
    del wr                       # (the ascent and the second sizes below rotate copies of their own)
    info = {"sizes_iterations": out["iterations"], "sizes_bound_first": val / S.c if val > -math.inf else None}
    if out["gave_up"]:
        # too slow to converge in the time (C = 512 3×3 under load: 4 iterations in 137 s, bound 0.57 of the
        # scalar one): the first-order ascent from the scalar shifts gets the rest of the time instead
        info["sizes_gave_up"] = True
        D, trace = _block_shift(S, w, t, stop, iterations)
        info["shift_steps"] = len(trace)
        if D is None:
            return None
        U2, d2 = eig_blocks(D)
        return U2, d2, -math.inf, None, info
    best = (U, d, val, z) if val > -math.inf else None
    # the ascent and the second sizes only when the first sizes converged within SIZES_SHARE of the time
    # (C = 256 3×3, n/d = 8.7: the first sizes took the whole share and 9 ascent steps + a few sizes
    # iterations in the ascent's basis ended below them, 0.9477 against 0.9705 of the best error)
    if (best is None or S.timed_out()
            or (stop is not None and time.perf_counter() > t0 + SIZES_SHARE * (stop - t0))):
        return None if best is None else (*best, info)
    # directions: the ascent from the sizes' blocks, then sizes in its basis
    ascent_stop = None if stop is None else time.perf_counter() + 0.5 * max(stop - time.perf_counter(), 0.0)
    D, trace = _block_shift(S, w, t, ascent_stop, iterations, D_init=blocks(w, U, d))
    info["shift_steps"] = len(trace)
    # (an ascent that never beat its start returns the sizes' own blocks: nothing new to size; measured at
    # C = 64 / 128 3×3, n/d 8.7 / 4.3, where it stops after 12 steps)
    if S.timed_out() or (stop is not None and time.perf_counter() > stop) or D is None:
        return (*best, info)
    U2, d2 = eig_blocks(D)
    wr2 = rotate(w, U2)
    d2, val2, z2, out2 = saddle_sizes(wr2, 0.97 * d2, bound_of, deadline=stop, **kw)
    info["sizes_iterations"] += out2["iterations"]
    info["sizes_bound_second"] = val2 / S.c if val2 > -math.inf else None
    if val2 > best[2]:
        best = (U2, d2, val2, z2)
    return (*best, info)


# ===================================================================================== root restarts
def _shift_in_basis(w: Whitened, rel: Relaxation, U: list | None) -> list[np.ndarray]:
    """The blocks ``D_g`` of ``rel``'s shift in ``w``'s whitened basis (``rel`` works in ``rotate(w, U)``, or in
    ``w`` itself when ``U`` is None)."""
    if U is None:
        return [np.diag(rel.tc[w.cols(g)]) for g in range(w.n_channels)]
    return blocks(w, U, rel.tc)


def _inherited_shift(w: Whitened, whitening: list[np.ndarray], D: list[np.ndarray]):
    """A cheap restart's relaxation ``(U, d)`` (bases and per-column sizes in ``w``) from the parent root's blocks
    ``D`` (in the reduced problem's columns), or None when no scaled copy verifies.

    Valid because the parent's ``M − blkdiag(D) ⪰ 0`` implies ``M' ⪰ D_N`` for the Schur complement ``M'`` of the
    fixed-in columns (minimize ``xᵀ(M − D)x`` over the fixed-in part of ``x``): the restarted relaxation with
    ``D_N`` is the parent's with the fixed-in channels at ``z = 1``. Round-off of ``M'`` and of the whitening is
    checked by one Cholesky factorization, backing off by 1 % and 10 %.
    """
    Dw = [T.T @ Dg @ T if T.size else np.zeros((0, 0)) for T, Dg in zip(whitening, D)]
    U, d = eig_blocks(Dw)
    d = np.maximum(d, 0.0)
    Db = blocks(w, U, d)
    for scale in (1.0, 0.99, 0.9):
        A = w.M.copy()                    # (one r×r: the blocks subtracted in place, no r×r matrix of them)
        for g in range(w.n_channels):
            sl = w.cols(g)
            A[sl, sl] -= scale * Db[g]
        A[np.diag_indices_from(A)] -= Q_MARGIN
        try:
            scipy.linalg.cholesky(A.T, lower=True, overwrite_a=True, check_finite=False)   # (in place: symmetric)
            return U, scale * d
        except np.linalg.LinAlgError:
            continue
    return None


def _restart(S: _Search, w: Whitened, L: float | None, a: np.ndarray | None, shift_blocks=None):
    """The root's reduced-cost fixings from its minorant ``(L, a)`` and, when they settle at least
    ``RESTART_MIN_SHARE`` of the whitened columns (of at least ``RESTART_INHERIT_MIN_COLUMNS``) and time is left,
    the free channels' problem to solve instead (:mod:`solvers.selection.restart`) with its ``k`` and budget, and
    (below ``RESTART_MIN_COLUMNS``, a cheap restart) the root's shift blocks for it from ``shift_blocks()``.
    None: no restart."""
    n = w.col_group.size
    if a is None or S.best_mask is None:
        return None
    if n >= RESTART_MIN_COLUMNS:
        cheap = False
    elif n >= RESTART_INHERIT_MIN_COLUMNS and shift_blocks is not None:
        cheap = True
    else:
        return None
    if S.deadline is not None and S.deadline - time.perf_counter() < RESTART_MIN_SECONDS:
        return None
    C = w.n_channels
    nothing = np.zeros(C, bool)
    fin, fout, child = _fix_by_reduced_cost(S, L, a, nothing, nothing)
    if not child:                      # everything settled: the tree's root is a leaf, nothing to restart
        return None
    settled = int((fin | fout)[w.col_group].sum())
    if settled == 0 or settled < RESTART_MIN_SHARE * w.col_group.size:
        return None
    reduced = reduce_problem(w, S.costs, fin, fout)
    if reduced is None:
        return None
    r, cap = S.limits(fin)
    if r is not None:
        if r < 1:
            return None
        r = min(r, reduced.problem.n_channels)
    if cap is not None and cap < reduced.problem.costs.min():
        return None
    inherit = None
    if cheap:
        D = shift_blocks()
        inherit = [D[g] for g in reduced.free]
    return reduced, r, cap, int(fout.sum()), inherit


def _certificate(objective: float, lower: float, rel_gap: float, timed_out: bool) -> tuple[float, Status]:
    """The reported bound (``lower`` less the round-off allowance, capped by ``objective``; relative errors) and the
    status: OPTIMAL within ``rel_gap``, else TIME_LIMIT when the clock stopped the search, else FEASIBLE (stopped
    by round-off: a valid set, gap not closed)."""
    bound = max(min(lower, objective) - BOUND_SAFETY, 0.0)
    gap = max(0.0, objective - bound) / max(objective, 1e-12)
    if gap <= rel_gap or objective - bound <= 1e-11:
        return bound, Status.OPTIMAL
    return bound, Status.TIME_LIMIT if timed_out else Status.FEASIBLE


def _solve_restart(problem: SelectionProblem, S: _Search, restart, info: dict, floor: float, *,
                   start: float, backend: str, rel_gap: float, **options) -> SelectionResult:
    """Solve the reduced problem of :func:`_restart` with :func:`select_exact` and report it in the original
    problem's terms: its set lifted (or the root's incumbent, if better), its bound joined with the bounds
    of the subtrees the root's fixings pruned."""
    reduced, r, cap, n_out, inherit = restart
    left = None if S.deadline is None else max(S.deadline - time.perf_counter(), 1e-3)
    initial, best = None, S.best_mask
    allowed = reduced.fixed_in.copy()
    allowed[reduced.free] = True
    if best is not None and not (reduced.fixed_in & ~best).any() and not (best & ~allowed).any():
        initial = best[reduced.free]          # the incumbent is a set of the reduced problem: no new warm start
        options["warm_start"] = False
    inner = select_exact(reduced.problem, k=r, budget=cap, backend="bnb", time_limit=left, rel_gap=rel_gap,
                         initial=initial, _restarted=True, _inherit=inherit, **options)
    c, scale = S.c, reduced.problem.target_sq / S.c     # (reduced relative errors × scale = original ones)
    n_reduced = reduced.problem.n_channels
    reduced.problem = None                  # (its Schur complement, freed before the original problem's refits)
    mask, best_from = reduced.lift(inner.mask), inner.info.get("best_from", "")
    if best_from == "initial":                          # (the root's incumbent, passed down)
        best_from = S.best_source
    if best is not None and S.best_err / c < inner.objective * scale:
        mask, best_from = best, S.best_source
    objective = problem.error(mask)           # (two refits of the original in all, as without a restart)
    # every set is either in the reduced problem or in a subtree the root's fixings pruned
    lb = max(min(inner.bound * scale * c, S.pruned_min), floor)
    bound, status = _certificate(objective, lb / c, rel_gap, inner.status is Status.TIME_LIMIT or S.timed_out())
    root_red = inner.info.get("root_bound")
    here = {"fixed_in": int(reduced.fixed_in.sum()), "fixed_out": n_out, "channels": n_reduced,
            "k": r, "root_bound": None if root_red is None else float(root_red * scale),
            "shifts": "inherited" if inherit is not None else "searched",
            "time": info["time_root"], "time_root": inner.info.get("time_root")}
    sources = dict(S.sources)
    for src, e in inner.info.get("incumbents", {}).items():
        sources[src] = min(e * scale, sources.get(src, math.inf))
    # (nested restarts report their root bounds in their own problem's units: brought to this one's)
    nested = [{**x, "root_bound": None if x.get("root_bound") is None else x["root_bound"] * scale}
              for x in inner.info.get("restarts", [])]
    info.update(restarts=[here, *nested], incumbents=sources, best_from=best_from,
                solves=info.get("solves", 0) + inner.info.get("solves", 0),
                node_shifts=S.node_shifts + inner.info.get("node_shifts", 0),
                stalled=inner.info.get("stalled", False), bound=options["bound"],
                workers=inner.info.get("workers", options["workers"]))
    return result_from_mask(problem, mask, method="exact", start=start, backend=backend,
                            iterations=inner.iterations + 1, bound=bound, status=status, info=info)


# ===================================================================================== entry point
def select_exact(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                 backend: str | None = None, time_limit: float | None = None, seed: int = 0,
                 rel_gap: float = DEFAULT_GAP, warm_start: bool = True, lasso: bool = True,
                 fw_iterations: int = 1, shift: str = "block", shift_iterations: int = 60,
                 bound: str = "conditional", workers: int = 1, restart: bool = True,
                 initial: np.ndarray | None = None, _restarted: bool = False,
                 _inherit: list | None = None) -> SelectionResult:
    """Optimal channel set under ``|S| <= k`` and/or ``Σ cost <= budget``, with a certified gap.

    Parameters
    ----------
    problem : SelectionProblem
    k : int, optional
        At most ``k`` channels (the optimum keeps exactly ``k`` when no budget binds: the refit
        error never increases when a channel is added).
    budget : float, optional
        ``Σ_{g∈S} problem.costs[g] <= budget``.
    backend : {"bnb", "highs", "scip"}, optional
        Default ``"bnb"`` (see the module docstring). ``"scip"`` needs pyscipopt.
    time_limit : float, optional
        Wall-clock seconds for the whole call (warm start included); on hitting it the result is
        ``Status.TIME_LIMIT`` with the best set found and the bound proven so far.
    seed : int
        Unused (deterministic); accepted for the common signature.
    rel_gap : float
        Stop once ``(objective − bound)/objective <= rel_gap`` (default 1e-4): ``Status.OPTIMAL``.
    warm_start, lasso : bool
        Seed the incumbent with greedy/backward/swaps (and LASSO, cardinality only).
    shift : {"block", "ascent", "scalar"}
        The perspective shifts: ``"scalar"`` one ``t_g`` per channel (trace-maximal, Newton);
        ``"ascent"`` then climbs the root relaxation value over block-diagonal ``D_g`` by supergradient
        ascent (:func:`solvers.selection.perspective.optimize_shift`, at most ``shift_iterations`` steps
        and a quarter of ``time_limit``); ``"block"`` (default) takes the sizes of ``D_g`` from an
        interior-point method (:func:`solvers.selection.perspective.saddle_sizes`) and the directions
        from the ascent (:func:`_newton_blocks`; up to 37 % of ``time_limit``, 60 % past
        ``BLOCK_LARGE_COLUMNS`` whitened columns, the scalar search 3 %). All give
        valid bounds; ``info`` reports the root bound of the scalar shifts and of the one used.
    bound : {"conditional", "perspective"}
        Node bounds of ``backend="bnb"``: ``"conditional"`` (default) re-certifies the shifts at every
        node on the free channels only (:mod:`solvers.selection.conditional`: no shift needed on
        fixed-in channels, fixed-out columns leave ``M − D ⪰ 0``; inherited down the tree);
        ``"perspective"`` keeps the root's shifts at every node (the bound before issue 15). Both
        are valid; measured on bench_exact's C = 128 3×3 layer in 240 s: optimal (400 nodes) against a
        5.3 % gap. ``info["node_shifts"]`` counts the nodes that got a raised shift.
    fw_iterations : int
        Frank–Wolfe steps per B&B node (default 1: cheap nodes beat tight ones here; children
        inherit the parent's relaxed point, so the relaxation keeps converging down the tree).
        The root always gets ``ROOT_ITERATIONS``.
    workers : int
        Processes that bound the tree's nodes in parallel (``backend="bnb"``; default 1: in this
        process). Each is spawned with one BLAS thread; the relaxation's large arrays (the whitened statistics,
        ``r² + r·m`` floats for r whitened columns) are copied once into shared memory and mapped read-only by
        every worker (:mod:`solvers.selection.shared_arrays`; where ``/dev/shm`` lacks room, each worker
        unpickles a copy of its own, as before session 32); the warm start and the root stay in this process.
        A script that calls it with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard of
        Python's process pools. ``info["workers"]`` says how
        many the tree used (absent when no tree ran: enumeration, or nothing to select).
    restart : bool
        ``backend="bnb"``: when the root's reduced-cost fixing settles at least ``RESTART_MIN_SHARE`` of the
        whitened columns, solve the free channels' own problem instead (:mod:`solvers.selection.restart`:
        smaller factorizations), recursively. From ``RESTART_MIN_COLUMNS`` = 3,000 whitened columns on its
        shifts are searched afresh; from ``RESTART_INHERIT_MIN_COLUMNS`` = 500 to there it keeps the root's
        (a cheap restart: no second shift search). ``info["restarts"]`` lists each restart (channels fixed in
        and out, channels left and ``k``, its root bound in the original units, ``shifts`` "searched" or
        "inherited", ``time`` when it started and ``time_root`` its own warm start + root seconds).
    initial : bool array (C,), optional
        A set to start from (e.g. a heuristic's answer): the first incumbent when feasible, before the warm
        start (``info["incumbents"]["initial"]``). A restart passes the root's incumbent this way and skips the
        warm start of the restarted problem (the incumbent is already a swap local optimum there).
    _restarted : bool
        Internal: set on a restart's own call (its time shares differ, see ``BLOCK_SHARE_LARGE_RESTARTED``).
    _inherit : list of arrays, optional
        Internal: a cheap restart's shift blocks ``D_g`` in the problem's columns (the parent root's, valid for
        the Schur complement), used as they are with no shift search (``info["shift_used"] = "inherited"``).
        (Its root starts from z = 0.5, not from the parent root's relaxed point: at C = 256 3×3 that start took
        its root 6.5 s instead of 2.9 s and the tree then bounded 749 nodes instead of 1,226–1,413 in 300 s.)

    Returns
    -------
    SelectionResult
        ``objective`` the refit error of the chosen set (relative), ``bound`` a proven lower bound on
        the optimum, ``gap``, ``status``, ``backend``, ``iterations`` (nodes / master solves / SCIP
        nodes), ``info``: ``root_bound`` (the root bound used), ``root_bound_scalar`` (with the
        scalar shifts), ``shift_used`` (``"block"``, ``"ascent"`` or ``"scalar"``), ``shift_time``/``shift_steps``
        (block ascent), ``sizes_iterations``/``sizes_bound_first``/``sizes_bound_second`` (interior-point
        sizes: iterations, root bound in the (M⁻¹)_gg basis and in the ascent's), ``shift_mean``/``shift_min`` (the scalar ``t``), ``time_warm``/``time_shift``/
        ``time_root`` (seconds), ``incumbents`` (best error found by each heuristic), ``solves``
        (linear solves of the relaxation).
    """
    start = time.perf_counter()
    backend = "bnb" if backend is None else str(backend).lower()
    if backend not in BACKENDS:
        raise SolverNotAvailableError(f"backend must be one of {list(BACKENDS)} for method 'exact'; got {backend!r}")
    if backend == "scip" and importlib.util.find_spec("pyscipopt") is None:
        raise SolverNotAvailableError("backend 'scip' needs pyscipopt (pip install pyscipopt); it is not installed")
    if backend == "highs" and importlib.util.find_spec("highspy") is None:
        raise SolverNotAvailableError("backend 'highs' needs highspy; it is not installed")
    if k is None and budget is None:
        raise InvalidInputError("k (channels to keep) or budget (total cost to keep) must be given; got neither")
    if k is not None:
        k = problem.check_k(k)
    if budget is not None:
        budget = problem.check_budget(budget)
    if not (isinstance(rel_gap, (int, float)) and 0 <= rel_gap < 1):
        raise InvalidInputError(f"rel_gap must be in [0, 1); got {rel_gap!r}")
    if time_limit is not None and not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0 seconds; got {time_limit}")
    if shift not in SHIFTS:
        raise InvalidInputError(f"shift must be one of {list(SHIFTS)}; got {shift!r}")
    if bound not in BOUNDS:
        raise InvalidInputError(f"bound must be one of {list(BOUNDS)}; got {bound!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers must be an integer >= 1; got {workers!r}")
    for name, flag in (("warm_start", warm_start), ("lasso", lasso), ("restart", restart)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InvalidInputError(f"{name} must be True or False; got {flag!r}")
    for name, n in (("fw_iterations", fw_iterations), ("shift_iterations", shift_iterations)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"{name} must be an integer >= 0; got {n!r}")
    # (the final refits of the chosen set cannot be interrupted: their time is kept back)
    deadline = None if time_limit is None else start + float(time_limit) - 2.0 * refit_seconds(problem, k)
    bound_kind = bound

    if _inherit is not None:
        w, whitening = whiten(problem, transforms=True, lazy=True)
    else:
        # (large one-column groups: M read from the statistics throughout — warm start, Newton shifts, root, cuts,
        # tree, the fallback ascent — made an array only for the block shifts' root, below)
        w = whiten(problem, lazy=True)
    C = problem.n_channels
    c = problem.target_sq
    info: dict = {}
    # The trivial case: everything fits.
    if (k is None or k >= C) and (budget is None or problem.costs.sum() <= budget + 1e-9):
        full = np.ones(C, bool)
        err = problem.error(full)
        return result_from_mask(problem, full, method="exact", start=start, backend=backend, bound=err,
                                status=Status.OPTIMAL, info={"trivial": True})
    S = _Search(problem, k, budget, Relaxation(w, np.zeros(C)), deadline, rel_gap)
    S.conditional = bound == "conditional"
    rate = None          # the measured factorization speed, once the root is known not to fit at FLOP_RATE
    # (large one-column layers: Newton shifts and the ascent instead of the block shifts, see ONE_COLUMN_ASCENT_MIN)
    one_column_ascent = (CUT_ROOT and backend == "bnb" and _inherit is None and shift == "block"
                         and w.M.shape[0] >= ONE_COLUMN_ASCENT_MIN and int(np.diff(w.starts).max(initial=0)) <= 1)
    if initial is not None:
        S.offer(problem.check_mask(initial), "initial")
    if warm_start:
        # (when not even the shift search and the root fit the time limit, the incumbent is all the
        # call can give: the warm start then gets the whole limit)
        root_fits = _affordable(w.M.shape[0], 5.0, deadline)
        if not root_fits:
            # (the root is decided at the assumed speed, which also covers its Frank–Wolfe solves; the ascent's
            # fallback at the machine's own)
            rate = _measured_flop_rate(min(w.M.shape[0], CUT_RATE_SIZE))
            if deadline is not None and rate > FLOP_RATE:
                # (the final refits' time kept back, at the measured speed: 28 s of a 60 s limit at C = 11,008
                # at the assumed one, 7 s at the 2-core CPU's)
                deadline = start + float(time_limit) - 2.0 * refit_seconds(problem, k) * FLOP_RATE / rate
                S.deadline = deadline
        # (the shift's factorizations must fit between the warm start's end and the deadline; checked again after
        # the warm start, and where that fails the warm start goes on: one 3,072² factorization measures 27–41
        # GFLOP/s on the same idle 2-core CPU)
        cut_fits = not root_fits and (deadline is None or _affordable(
            w.M.shape[0], CUT_FACTORIZATIONS,
            deadline - max(start + CUT_WARM_SHARE * float(time_limit) - time.perf_counter(), 0.0), rate=rate))
        _warm_start(S, w, lasso, None if deadline is None
                    else start + WARM_SHARE * float(time_limit) if root_fits
                    else start + CUT_WARM_SHARE * float(time_limit) if cut_fits else deadline)
    info["time_warm"] = time.perf_counter() - start
    # (multi-column groups read from the statistics (a BlockGram) stay views throughout: the scalar shift, its root,
    # the block shifts' relaxations and the tree factor what they need from the view. Each read is a gather and two
    # block transforms (a half-size factorization at C = 512 3×3: 0.29 s against 0.13 s from an array), but the array
    # was a second copy of the statistics: session 32 measured exact at 60 s with the view kept at C = 512 3×3 peak
    # 1.54× instead of 2.0× (gap 3.93 % against 3.95 %; 1.46× once the sizes factored in place) and at C = 1,024 3×3
    # 0.60× instead of 1.57× (5.73 / 5.74 %))
    lazy_view = isinstance(w.M, BlockGram)
    if backend == "bnb" and budget is None and math.comb(C, k) <= ENUMERATE_MAX:
        # Few enough sets to evaluate them all (each an exact refit): the optimum, proven by
        # enumeration — the relaxation cannot beat that on ill-conditioned small layers.
        q = int(np.diff(w.starts).max()) * k
        enum_deadline = (None if deadline is None
                         else time.perf_counter() + ENUMERATE_SHARE * max(deadline - time.perf_counter(), 0.0))
        # (tried when its estimate takes at most a quarter of the limit: a loaded machine runs slower)
        if _affordable(q, 8.0 * math.comb(C, k), enum_deadline):
            saved, S.deadline = S.deadline, enum_deadline
            lowest = _enumerate(S, w, k)
            S.deadline = saved
            if lowest is not None:
                objective = problem.error(S.best_mask)
                info.update(enumerated=math.comb(C, k), incumbents=dict(S.sources), best_from=S.best_source,
                            root_bound=None, shift_used="none", bound=bound_kind, time_enumeration=time.perf_counter() - start)
                bound_e = min(lowest / c, objective)
                # (optimal up to the enumeration's round-off allowance, also where the error itself is ~0)
                proven = objective - bound_e <= max(rel_gap * objective, 1e-9)
                return result_from_mask(problem, S.best_mask, method="exact", start=start, backend=backend,
                                        iterations=math.comb(C, k), bound=bound_e,
                                        status=Status.OPTIMAL if proven else Status.FEASIBLE, info=info)
            info["enumeration_timed_out"] = True
    inherited = None
    if _inherit is not None and _affordable(w.M.shape[0], 4.0, deadline):
        inherited = _inherited_shift(w, whitening, _inherit)
    shift_fits = inherited is None and _affordable(w.M.shape[0], 4.0, deadline)
    if shift_fits and not one_column_ascent and not lazy_view:
        w = densified(w)             # (the block shift search subtracts and factors all of M, many times)
    if inherited is not None:
        # (a cheap restart: the parent root's shifts, valid for the Schur complement; no shift search)
        t = np.zeros(C)
    elif shift_fits:
        # (shift="block" only starts its interior-point sizes from t: a short search suffices, measured at
        # C = 128 3×3: sizes from 0.9·λ_min(M) reach 0.9509 of the best error, from the Newton shifts 0.9512)
        share = (ONE_COLUMN_SHIFT_SHARE if one_column_ascent else SHIFT_SHARE_BLOCK if shift == "block"
                 else SHIFT_SHARE)
        t = choose_shift(w, deadline=None if deadline is None else time.perf_counter() + share * float(time_limit))
    else:   # a shift search and a root solve would overrun the time limit: no root relaxation
        t = np.zeros(C)
        info["skipped_root"] = True
        if rate is None:        # (not measured yet: no warm start, or the root looked affordable then)
            rate = _measured_flop_rate(min(w.M.shape[0], CUT_RATE_SIZE))
        if _affordable(w.M.shape[0], CUT_FIRST_FACTORIZATIONS, deadline, rate=rate):
            # (the ascent's fallback: the scalar shift 0.9·λ_min(M) past NEWTON_MAX_COLUMNS, two factorizations;
            # the second is started only when the first's own time says it ends with a tenth of the rest left)
            t = choose_shift(w, deadline=None if deadline is None
                             else deadline - 0.1 * max(deadline - time.perf_counter(), 0.0))
        if not np.any(t > 0) and warm_start and S.best_mask is not None and not S.timed_out():
            # (no bound after all: the rest of the time improves the incumbent, as a warm start to the deadline would)
            info["warm_resumed"] = True
            _offer_swaps(S, w)
    info["time_shift"] = time.perf_counter() - start - info["time_warm"]
    S.rel = rel = Relaxation(w, t) if inherited is None else Relaxation(rotate(w, inherited[0]), inherited[1])
    U_used = None if inherited is None else inherited[0]     # (the basis of the shifts in use, for a restart)
    nothing = np.zeros(C, bool)
    if S.best_mask is None:
        S.offer(_round(S, np.zeros(C), np.zeros(C), nothing, nothing), "round")
    info["shift_mean"] = float(t.mean()) if C else 0.0
    info["shift_min"] = float(t.min()) if C else 0.0

    root_cuts: list = []
    if info.get("skipped_root"):
        # No root relaxation fits. With every channel shifted, the ascent on the minorant's weights from the
        # incumbent's cut bounds the optimum (one product per step); else the trivial bound 0 (gap 100 %).
        lb, steps = 0.0, 0
        if rel.covers_all and rel.shifted.any() and S.best_mask is not None and not S.timed_out():
            t_cut = time.perf_counter()
            keep = S.best_mask
            W, _ = rel.solve(keep.astype(np.float64), ~keep)
            rel.forget()                          # (the ascent updates W in place: no copy, no cached second name)
            lb, steps, _, _ = _cut_ascent(S, W, deadline, own=True)
            info.update(cut_steps=steps, time_cut=time.perf_counter() - t_cut, shift_used="scalar")
        objective = problem.error(S.best_mask)
        bound, status = _certificate(objective, max(lb, 0.0) / c, rel_gap, True)
        info.update(root_bound=bound, root_bound_scalar=bound, incumbents=dict(S.sources), best_from=S.best_source,
                    solves=rel.solves)
        info.setdefault("shift_used", "none")
        return result_from_mask(problem, S.best_mask, method="exact", start=start, backend=backend,
                                iterations=steps, bound=bound, status=status, info=info)
    # (under shift="block" past BLOCK_LARGE_COLUMNS the scalar root is only a fallback of the block shifts, and
    # each of its Frank–Wolfe steps factors r×r matrices: a few steps, the time goes to the sizes)
    scalar_steps = (SCALAR_ROOT_ITERATIONS_LARGE if (shift == "block" and w.M.shape[0] > BLOCK_LARGE_COLUMNS)
                    or one_column_ascent else ROOT_ITERATIONS)
    scalar_root: dict = {}
    # (the root's best weights (r×m) are kept only where the minorant ascent below may start from them)
    ascent_may_follow = CUT_ROOT and backend == "bnb" and (w.M.shape[0] > BLOCK_LARGE_COLUMNS or one_column_ascent)
    root_lb, root_z, root_L, root_a = _relax(S, nothing, nothing, np.full(C, 0.5), max(fw_iterations, scalar_steps),
                                             cuts=root_cuts, converge=backend == "bnb",
                                             out=scalar_root if ascent_may_follow else None)
    info["root_bound_scalar"] = max(root_lb, 0.0) / c
    info["shift_used"] = "scalar" if inherited is None else "inherited"
    block_in_reach = not one_column_ascent
    if one_column_ascent:
        info["block_skipped"] = True
    elif CUT_ROOT and backend == "bnb" and w.M.shape[0] > BLOCK_LARGE_COLUMNS and deadline is not None:
        # (the block shifts' first few iterations cost BLOCK_MIN_FACTORIZATIONS r×r factorizations: at C = 1,024 3×3
        # their first outlasted a 120 s share by 64 s and gave nothing; the minorant ascent takes that time instead)
        share_end = time.perf_counter() + BLOCK_SHARE_LARGE_RESTARTED * float(time_limit)
        block_in_reach = _affordable(w.M.shape[0], BLOCK_MIN_FACTORIZATIONS, min(deadline, share_end))
        if not block_in_reach:
            info["block_skipped"] = True
    if (inherited is None and shift in ("block", "ascent") and root_lb < S.threshold and block_in_reach
            and rel.covers_all and not S.timed_out()):
        # Block shifts D_g; any feasible D keeps the bound valid, so the stronger relaxation simply
        # replaces the scalar one (its root cuts stay valid too).
        t_opt = time.perf_counter()
        share = BLOCK_SHARE + (SHIFT_SHARE - SHIFT_SHARE_BLOCK if shift == "block" else 0.0)
        if shift == "block" and w.M.shape[0] > BLOCK_LARGE_COLUMNS:
            share = max(share, BLOCK_SHARE_LARGE_RESTARTED if _restarted
                        else BLOCK_SHARE_LARGE_BEFORE_RESTART if restart and backend == "bnb" else BLOCK_SHARE_LARGE)
        stop = None if deadline is None else min(deadline, t_opt + share * float(time_limit))
        U = d = None
        z_start, sizes_lb = root_z, -math.inf
        if shift == "block":
            found = _newton_blocks(S, w, t, stop, shift_iterations)
            if found is not None:
                U, d, sizes_lb, z_sizes, more = found
                info.update(more)
                # (the OA backends keep the scalar root's point: its root cuts closed SCIP's budgeted bank case)
                if z_sizes is not None and backend == "bnb":
                    z_start = z_sizes
        else:
            D, trace = _block_shift(S, w, t, stop, shift_iterations)
            info["shift_steps"] = len(trace)
            if D is not None:
                U, d = eig_blocks(D)
        if U is not None:
            S.rel = Relaxation(rotate(w, U), d)     # (w: an array, or a BlockGram kept a view)
            root_steps = (ROOT_ITERATIONS_AFTER_SIZES if backend == "bnb" and sizes_lb > -math.inf
                          else ROOT_ITERATIONS)
            lb2, z2, L2, a2 = _relax(S, nothing, nothing, z_start, max(fw_iterations, root_steps),
                                     cuts=root_cuts, converge=backend == "bnb")
            lb2 = max(lb2, sizes_lb)           # (the sizes' own minorant: valid for every set too)
            if lb2 > root_lb:                   # the tree uses whichever relaxation proved more at the root
                root_lb, root_z, rel, root_L, root_a = lb2, z2, S.rel, L2, a2
                U_used = U
            else:
                S.rel = rel
        info["shift_used"] = shift if rel.w is not w else "scalar"
        info["shift_time"] = time.perf_counter() - t_opt
    if (ascent_may_follow and info["shift_used"] == "scalar"
            and root_lb < S.threshold and "W" in scalar_root and not S.timed_out()
            and rel.covers_all and rel.shifted.any()):
        # A large layer left with the scalar root (the block sizes did not fit): a few Frank–Wolfe steps of O(r³)
        # each, where the minorant ascent takes steps of one r×r·m product.
        # (from the scalar root's best weights: on ill-conditioned layers the incumbent's cut starts far below zero,
        # measured at C = 1,024 3×3 with t = 0.075: still below zero after 45 steps)
        t_cut = time.perf_counter()
        stop = None if deadline is None else min(deadline, t_cut + CUT_ROOT_SHARE * float(time_limit))
        # (the ascent takes the scalar root's weights over, updated in place: one r×m fewer beside its five)
        lb_c, steps, L_c, a_c = _cut_ascent(S, scalar_root.pop("W"), stop, own=True)
        info.update(cut_steps=steps, time_cut=time.perf_counter() - t_cut, root_bound_cut=max(lb_c, 0.0) / c)
        if lb_c > root_lb:
            root_lb, root_L, root_a = lb_c, L_c, a_c
    if backend == "bnb":
        # (what only the root used: its best weights (an r×m) and its cuts (the OA backends' master rows): not kept
        # beside a restart's reduced problem or the tree; _relax leaves no cached solves behind)
        scalar_root.clear()
        root_cuts.clear()
    # (the OA masters keep the short root: fifty near-parallel root cuts stall HiGHS's master on
    # round-off, measured on the test bank's budgeted C = 10 problem)
    # The monotone bound err(all channels) holds for every set too.
    floor = max(root_lb, c - w.explained(np.ones(C, bool)), 0.0)
    info["root_bound"] = floor / c
    stalled = False
    safe_floor = max(floor - BOUND_SAFETY * c, 0.0)
    info["time_root"] = time.perf_counter() - start     # (cumulative: warm start, shifts, root)
    if backend == "bnb" and restart:
        reduced = _restart(S, w, root_L, root_a, lambda: _shift_in_basis(w, rel, U_used))
        if reduced is not None:
            info["solves"] = rel.solves
            S.rel = rel = w = None          # (the reduced problem holds all the search still needs)
            return _solve_restart(problem, S, reduced, info, floor, start=start, backend=backend, rel_gap=rel_gap,
                                  warm_start=warm_start, lasso=lasso, fw_iterations=fw_iterations, shift=shift,
                                  shift_iterations=shift_iterations, bound=bound_kind, workers=workers)
    if backend == "bnb":
        lb, iters = _bnb(S, root_z, fw_iterations, workers)
    elif backend == "highs":
        lb, iters, stalled = _highs_oa(S, root_cuts, safe_floor, 1_000_000)
    else:
        lb, iters = _scip_oa(S, root_cuts, safe_floor)
    lb = max(lb, floor)
    objective = problem.error(S.best_mask)        # the reported objective: the library's own refit
    bound, status = _certificate(objective, lb / c, rel_gap, S.timed_out())
    info["stalled"] = stalled
    info["workers"] = workers if backend == "bnb" else 1
    info.update(incumbents=dict(S.sources), best_from=S.best_source, solves=rel.solves, bound=bound_kind,
                node_shifts=S.node_shifts)
    return result_from_mask(problem, S.best_mask, method="exact", start=start, backend=backend,
                            iterations=iters, bound=bound, status=status, info=info)


__all__ = ["select_exact", "choose_shift", "Relaxation", "BACKENDS", "DEFAULT_GAP"]
