"""Greedy channel selection on the Gram statistics: forward selection and backward elimination.

* ``method="greedy"`` — forward selection (ThiNet-style, Luo et al. 2017, but scored by the refit
  error rather than the un-refitted one): start from nothing and repeatedly add the channel whose
  addition reduces the least-squares refit error the most.
* ``method="backward"`` — backward elimination: start from every channel and repeatedly remove the
  channel whose removal increases the refit error the least.

Neither re-solves a least-squares problem per candidate. Both work in *whitened* coordinates (each
channel's columns are replaced by an orthonormal basis of their span, which leaves every refit
error unchanged) and keep running factorizations:

* forward keeps a Gram–Schmidt basis of the span of the chosen columns: the gain of adding channel
  ``g`` is ``tr(R_gᵀ S_g⁻¹ R_g)`` with ``R_g`` its residual cross-covariance and ``S_g`` its residual
  Gram (r_g×r_g), both updated by a rank-r_g correction per step — O(d·(s + m)·r) per step;
* backward keeps ``M_SS⁻¹`` and ``W_S``: the loss of removing ``g`` is ``tr(W_gᵀ (M⁻¹)_gg⁻¹ W_g)``,
  and removing it is a block downdate of the inverse — O(d²·r) per step.

With a cost budget (``budget=``, ``Σ cost ≤ budget``) forward picks the affordable channel with the
largest error reduction *per unit cost*, and backward removes the channel with the smallest error
increase per unit cost freed until the budget holds, then adds back (forward, per unit cost) what
still fits. Zero-cost channels count as infinitely cheap. With both ``k`` and ``budget`` both hold.

Greedy proves nothing: results are ``Status.FEASIBLE`` with ``bound=None``. Swap local search
(``method="swap"``, ``improve_by_swaps``) builds on these in :mod:`solvers.selection.swap`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from solvers.errors import InvalidInputError
from solvers.selection.baselines import result_from_mask
from solvers.selection.block_gram import BlockGram
from solvers.selection.linalg import subtract_product, symmetrize_in_place
from solvers.selection.panel_cholesky import factor_principal, solve_gathered
from solvers.selection.problem import SelectionProblem
from solvers.selection.scaled_gram import ScaledGram
from solvers.result import SelectionResult, Status

# Directions of a channel's span with energy below this fraction of the channel's largest are
# treated as zero (the same order as the refit's least-squares cut-off).
WHITEN_RTOL = 1e-12
# Residual energy of a candidate below this (whitened units: a channel direction has energy 1)
# means it is already in the span of the chosen columns.
SPAN_ATOL = 1e-10
# Tiny ridge (whitened units) keeping the backward inverse defined when channels are collinear;
# every reported error is recomputed by an exact refit anyway.
BACKWARD_RIDGE = 1e-10
# Forward selection on groups of this many channels or more adds several channels per scoring of the gains
# (:meth:`ForwardState.add_many`: matrix products instead of one memory-bound update per channel), in about
# FORWARD_ROUNDS rounds. Population layers (1×1, m = 256, k = C/2; 2 threads): C = 11,008 in 64 rounds of 86
# reaches 0.009383 in 14 s, where one channel at a time was stopped by a 54 s deadline at 0.009508 (it would need
# minutes); C = 4,096 0.00924221 in 4.4 s against 0.00924219 in 15.5 s. Smaller groups keep the exact greedy
# order (C = 2,048 in 64 rounds: 2.5e-5 relative worse; a 3×3 C = 512 in 4 rounds: 10 % worse).
FORWARD_BATCH_MIN_CHANNELS = 4096
FORWARD_ROUNDS = 64
# Whitening of one-column groups past this many channels is one vectorized pass (see _whiten_one_column), and
# past LAZY_MIN_CHANNELS a view when the caller asks for one (``whiten(lazy=True)``: at 1,000 channels M is 8 MB;
# exact's restarts at C = 2,048 reduce to ~1,700).
WHITEN_VECTOR_MIN_CHANNELS = 2000
LAZY_MIN_CHANNELS = 1000
# Multi-column groups of this many columns or more get the block-diagonal view (``whiten(lazy=True)``:
# :class:`~solvers.selection.block_gram.BlockGram`); smaller ones keep the dense whitening's arithmetic bit for bit.
LAZY_MIN_BLOCK_COLUMNS = 3000
# Backward elimination keeps an r×r inverse beside the whitened M: as a warm start (exact's, swap's) it runs only
# below this many whitened columns and on an M held as an array. Past it (C = 512 3×3: 4,608 columns, the whitened
# copy 0.95× the statistics) the inverse took exact and swap to 2.11× the statistics; for a Gram read lazily it is a
# second copy of them. Forward selection and swaps give the start there (on the bench's population layers of
# 1,200–11,008 one-column channels and C = 512 3×3, backward never gave a better start than forward + swaps).
BACKWARD_START_MAX_COLUMNS = 3000
# Assumed speed (flop/s, one core) when deciding whether an uninterruptible dense step (an r×r
# inverse) still fits before a deadline; the same figure as exact.FLOP_RATE.
FLOP_RATE = 1e10


def refit_seconds(problem: SelectionProblem, k: int | None) -> float:
    """Estimated seconds of the final refit on about ``k`` channels (a Cholesky of the kept columns
    and the products around it) — kept back from a time limit so that the whole call respects it."""
    if k is None:
        return 0.0
    s = problem.n_columns * min(k, problem.n_channels) / problem.n_channels
    return 2.0 * (s ** 3 / 3.0 + 2.0 * s * s * problem.n_outputs) / FLOP_RATE


def fits(flops: float, deadline: float | None) -> bool:
    """Whether ``flops`` of uninterruptible dense work fit before ``deadline`` (``time.perf_counter``)."""
    return deadline is None or flops / FLOP_RATE < deadline - time.perf_counter()


@dataclass(frozen=True)
class Whitened:
    """A selection problem with each channel's columns orthonormalized (``M_gg = I``).

    Attributes
    ----------
    M : array (r, r), or :class:`~solvers.selection.scaled_gram.ScaledGram`
        Gram of the whitened columns (unit diagonal blocks); ``r = Σ_g rank(G_gg)``. ``whiten(lazy=True)`` of
        a large one-column group gives the view that reads it from the statistics (no r×r copy).
    B : array (r, m)
        Whitened cross-covariance.
    target_sq : float
        ``‖Y‖²``.
    col_group : int array (r,)
        Channel of each whitened column.
    starts : int array (C + 1,)
        Columns of channel ``g`` are ``starts[g]:starts[g+1]`` (contiguous; empty for dead channels).
    """

    M: np.ndarray
    B: np.ndarray
    target_sq: float
    col_group: np.ndarray
    starts: np.ndarray

    @property
    def n_channels(self) -> int:
        return self.starts.size - 1

    def cols(self, g: int) -> slice:
        return slice(int(self.starts[g]), int(self.starts[g + 1]))

    def col_mask(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(mask, bool)[self.col_group]

    def explained(self, mask: np.ndarray) -> float:
        """``tr(B_Sᵀ M_SS⁻¹ B_S)`` (the refit's explained energy, in units of ‖Y‖²·target_sq)."""
        cm = self.col_mask(mask)
        if not cm.any():
            return 0.0
        return _explained(self.M, np.flatnonzero(cm), self.B)


def _explained(M, idx: np.ndarray, B: np.ndarray) -> float:
    """``tr(B_Sᵀ M_SS⁻¹ B_S)`` for the columns ``idx`` (``B``: all rows): ``M_SS`` gathered and factored in place
    (in panels past :func:`~solvers.selection.panel_cholesky.panel_threshold`: half an |S|×|S|), gathered again for
    the least-squares fallback when it is singular. ``B_S`` is solved in its own memory and gathered afresh for
    the trace: two |S|×m at most, none of them beside the factor's solve copy (the same sum, bit for bit)."""
    try:
        X = solve_gathered(factor_principal(M, idx, lower=False), B, idx)
    except np.linalg.LinAlgError:
        X = scipy.linalg.lstsq(M[np.ix_(idx, idx)], B[idx], cond=1e-12, check_finite=False)[0]
    BS = B[idx]
    return float(np.sum(np.multiply(X, BS, out=BS)))


def whiten(problem: SelectionProblem, *, transforms: bool = False, lazy: bool = False):
    """Orthonormalize each channel's columns (in the ``ZᵀZ`` inner product); refit errors are unchanged.

    For channel ``g`` with ``G_gg = U Λ Uᵀ``, the whitened columns are ``Z_g U Λ^{-1/2}`` (directions
    with ``λ <= WHITEN_RTOL · λ_max`` dropped: they carry no energy). The block-diagonal transform is
    applied block by block, in place on one copy of ``G``: O(d²·max r_g) time, one d×d of memory.

    With ``transforms=True`` returns ``(w, T)``: ``T[g]`` (q_g × r_g) maps channel ``g``'s whitened
    coordinates to its original columns (in the problem's column order within the channel).

    With ``lazy=True`` a group of one column per channel past ``LAZY_MIN_CHANNELS`` channels gets
    ``M`` as a :class:`ScaledGram` (read from ``problem.gram`` on access: no memory), and a group of several
    columns per channel with ``LAZY_MIN_BLOCK_COLUMNS`` columns or more as a :class:`BlockGram` (the same, with the
    block-diagonal transform applied on access); :func:`densified` turns either into the array where a method needs
    all of it.
    """
    G, Bx, groups, C = problem.gram, problem.cross, problem.groups, problem.n_channels
    order = np.argsort(groups, kind="stable")                    # columns grouped by channel
    if C and C == G.shape[0] and (C > WHITEN_VECTOR_MIN_CHANNELS or (lazy and C > LAZY_MIN_CHANNELS)):
        return _whiten_one_column(problem, order, transforms, lazy)
    bounds = np.searchsorted(groups[order], np.arange(C + 1))
    Tq, keeps = [], []                     # each channel's q×q transform (dropped directions: zero columns)
    for g in range(C):
        sl = slice(int(bounds[g]), int(bounds[g + 1]))
        q = sl.stop - sl.start
        lam, U = np.linalg.eigh(G[np.ix_(order[sl], order[sl])]) if q else (np.zeros(0), np.zeros((0, 0)))
        top = lam.max() if lam.size else 0.0
        keep = lam > WHITEN_RTOL * top if top > 0 else np.zeros(lam.size, bool)
        T = np.zeros((q, q))
        T[:, keep] = U[:, keep] / np.sqrt(lam[keep])
        Tq.append(T)
        keeps.append(keep)
    Ts = [T[:, keep] for T, keep in zip(Tq, keeps)]
    if lazy and G.shape[0] >= LAZY_MIN_BLOCK_COLUMNS:
        return _whiten_blocks_lazy(problem, order, bounds, Ts, transforms)
    M = G[np.ix_(order, order)] if np.any(order != np.arange(order.size)) else G.copy()
    B = Bx[order].copy()
    col_group, starts, keep_cols = [], [0], []
    for g in range(C):
        sl = slice(int(bounds[g]), int(bounds[g + 1]))
        q, T, keep = sl.stop - sl.start, Tq[g], keeps[g]
        if q == 1:
            f = float(T[0, 0])
            M[:, sl] *= f
            M[sl, :] *= f
            B[sl] *= f
        elif q:
            M[:, sl] = M[:, sl] @ T
            M[sl, :] = T.T @ M[sl, :]
            B[sl] = T.T @ B[sl]
        keep_cols.append(np.arange(sl.start, sl.stop)[keep])
        col_group += [g] * int(keep.sum())
        starts.append(starts[-1] + int(keep.sum()))
    kept = np.concatenate(keep_cols) if keep_cols else np.zeros(0, np.int64)
    if kept.size < M.shape[0]:                                     # rank-deficient channels: compress
        M = M[np.ix_(kept, kept)]
        B = B[kept]
    if M.shape[0] <= 4096:                                         # (large: the blocks keep it symmetric)
        symmetrize_in_place(M)
    for g in range(C):  # exact identity blocks (they are, up to round-off)
        s = slice(starts[g], starts[g + 1])
        M[s, s] = np.eye(starts[g + 1] - starts[g])
    w = Whitened(M=M, B=B, target_sq=problem.target_sq, col_group=np.asarray(col_group, np.int64),
                 starts=np.asarray(starts, np.int64))
    return (w, Ts) if transforms else w


def _whiten_blocks_lazy(problem: SelectionProblem, order: np.ndarray, bounds: np.ndarray, Ts: list[np.ndarray],
                        transforms: bool):
    """:func:`whiten` of a multi-column group as the view that reads ``M`` from the statistics (:class:`BlockGram`):
    the same transforms ``Ts`` (q_g × r_g), ``B`` transformed channel by channel (r×m)."""
    C = problem.n_channels
    cols = [order[int(bounds[g]):int(bounds[g + 1])] for g in range(C)]
    M = BlockGram(problem.gram, cols, Ts)
    B = np.empty((M.shape[0], problem.cross.shape[1]))
    for g in range(C):
        sl = slice(int(M.starts[g]), int(M.starts[g + 1]))
        if sl.stop > sl.start:
            B[sl] = Ts[g].T @ problem.cross[cols[g]]
    w = Whitened(M=M, B=B, target_sq=problem.target_sq, col_group=M.col_group.astype(np.int64), starts=M.starts)
    return (w, Ts) if transforms else w


def densified(w: Whitened) -> Whitened:
    """``w`` with ``M`` as an array (``w`` itself when it is one already): for methods that factor or invert all
    of ``M``, or read it entry by entry many times over."""
    if not isinstance(w.M, ScaledGram):
        return w
    return Whitened(M=w.M.dense(), B=w.B, target_sq=w.target_sq, col_group=w.col_group, starts=w.starts)


def _whiten_one_column(problem: SelectionProblem, order: np.ndarray, transforms: bool, lazy: bool = False):
    """:func:`whiten` of a problem with one column per channel: the diagonal scaling ``M = F G F``
    (``F = diag(G_jj^{-1/2})``) written in row blocks of one pass over ``G`` (the per-channel loop's strided
    column scalings took 3.4 s at C = 11,008, this 0.36 s), or with ``lazy`` the view that reads it so
    (:class:`ScaledGram`). Dead channels (``G_jj = 0``) lose their column."""
    G, C = problem.gram, problem.n_channels
    d = np.diagonal(G)[order]
    keep = d > 0
    f = np.zeros(C)
    f[keep] = 1.0 / np.sqrt(d[keep])
    kept = np.flatnonzero(keep)
    rows = order[kept]
    fk = f[kept]
    M = ScaledGram(G, rows, fk)
    if not lazy:
        M = M.dense()
    B = problem.cross[rows] * fk[:, None]
    starts = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    w = Whitened(M=M, B=B, target_sq=problem.target_sq, col_group=np.flatnonzero(keep).astype(np.int64),
                 starts=starts)
    if not transforms:
        return w
    Ts = [np.array([[f[g]]]) if keep[g] else np.zeros((1, 0)) for g in range(C)]
    return w, Ts


# ------------------------------------------------------------------------------------ forward
def _padded_index(w: Whitened) -> np.ndarray:
    """(C, r_max) column indices of each channel, padded with ``r`` (an extra zero row/column)."""
    sizes = np.diff(w.starts)
    rmax = max(int(sizes.max()), 1) if sizes.size else 1
    idx = w.starts[:-1, None] + np.arange(rmax)[None, :]
    return np.where(np.arange(rmax)[None, :] < sizes[:, None], idx, w.M.shape[0])


_BLOCK_BYTES = 4 * 2**20  # float64 bytes of R gathered at a time for the channel Grams


def _pad_rows(A: np.ndarray) -> np.ndarray:
    return np.vstack([A, np.zeros((1,) + A.shape[1:])])


class ForwardState:
    """Gram–Schmidt state of forward selection: chosen channels and every candidate's residuals.

    ``K`` (r × s) holds the inner products of every whitened column with the orthonormal basis of the
    chosen span; ``R`` (r × m) the residual cross-covariance; ``S`` (C × r_max × r_max) the residual
    Gram of every channel (padded with identity), updated for all channels at once. A gain needs only
    ``S_g`` and ``H_g = R_g R_gᵀ`` (r_g × r_g): when every channel has the same number of columns
    ``H`` comes from one batched product over ``R`` viewed as (C, r_g, m), with no gathered or
    squared copy of ``R`` (what dominated wide groups with many outputs), else from a gather in
    channel blocks.
    """

    def __init__(self, w: Whitened, columns: int | None = None):
        self.w = w
        r = w.M.shape[0]
        self.idx = _padded_index(w)
        rmax = self.idx.shape[1]
        self.pad = self.idx == r
        # Kᵀ by rows (K = _Kt[:s].T is a view BLAS reads without a copy); s never exceeds r, nor ``columns``
        # (the caller's bound: the k widest channels' columns), so room for all of it up front when that is
        # known or small beside M (no regrowth copies), else grown by doubling. (At C = 11,008, k = 5,504 the
        # doubling ended at 8,192 rows beside the 4,096 it copied: 1.1 GB where 0.48 suffice.)
        self._Kt = np.empty((min(r, columns) if columns is not None else r if r <= 8192 else 16, r))
        self.s = 0
        self._R = _pad_rows(w.B)  # (r + 1) × m, the last row zero (padding of the gathers)
        self.R = self._R[:r]
        sizes = np.diff(w.starts)
        self.uniform = bool(sizes.size) and bool(np.all(sizes == rmax)) and rmax * w.n_channels == r
        self.S = np.broadcast_to(np.eye(rmax), (w.n_channels, rmax, rmax)).copy()
        self.chosen = np.zeros(w.n_channels, dtype=bool)
        self.explained = 0.0

    @property
    def K(self) -> np.ndarray:
        return self._Kt[:self.s].T

    def _grams(self, cand: np.ndarray) -> np.ndarray:
        """``H_g = R_g R_gᵀ`` (c × r_max × r_max, zero-padded) of the channels ``cand``."""
        rmax, m = self.idx.shape[1], self.R.shape[1]
        if self.uniform:
            R3 = self.R.reshape(self.w.n_channels, rmax, m)
            return (R3 @ np.swapaxes(R3, 1, 2))[cand]
        H = np.empty((cand.size, rmax, rmax))
        step = max(1, _BLOCK_BYTES // max(8 * rmax * m, 1))
        for i in range(0, cand.size, step):
            Rg = self._R[self.idx[cand[i:i + step]]]                  # c × r_max × m
            H[i:i + step] = Rg @ np.swapaxes(Rg, 1, 2)
        return H

    def gains(self) -> np.ndarray:
        """Explained energy each unchosen channel would add (C,); chosen channels get -inf."""
        out = np.full(self.w.n_channels, -np.inf)
        cand = np.flatnonzero(~self.chosen)
        if cand.size == 0:
            return out
        H = self._grams(cand)
        if self.idx.shape[1] == 1:
            Sg = self.S[cand, 0, 0]
            ok = Sg > SPAN_ATOL
            out[cand] = np.where(ok, H[:, 0, 0] / np.where(ok, Sg, 1.0), 0.0)
            return out
        lam, U = np.linalg.eigh(self.S[cand])
        keep = lam > SPAN_ATOL
        energy = np.sum(U * (H @ U), axis=1)                           # ‖(Uᵀ R_g)_i‖², c × r_max
        out[cand] = np.sum(np.where(keep, energy / np.where(keep, lam, 1.0), 0.0), axis=1)
        return out

    def add(self, g: int) -> None:
        sl = self.w.cols(g)
        self.chosen[g] = True
        q0 = sl.stop - sl.start
        if q0 == 0:
            return
        lam, U = np.linalg.eigh(self.S[g, :q0, :q0])
        keep = lam > SPAN_ATOL
        if not keep.any():
            return
        T = U[:, keep] / np.sqrt(lam[keep])      # S_g^{-1/2} on its range
        Kt = self._Kt[:self.s]
        Knew = (self.w.M[:, sl] - Kt.T @ Kt[:, sl]) @ T               # r × q
        pnew = T.T @ self.R[sl]                                        # q × m
        self.explained += float(np.sum(pnew * pnew))
        self._extend(Knew, pnew)

    def _extend(self, Knew: np.ndarray, pnew: np.ndarray) -> None:
        """Take the new orthonormal directions ``Knew`` (r × q, with ``pnew = Knewᵀ``-projections of
        ``R``, q × m) into the basis: residual cross, basis columns, candidates' residual Grams."""
        self.R -= Knew @ pnew
        q = Knew.shape[1]
        if self.s + q > self._Kt.shape[0]:                             # grow by doubling (amortized)
            grown = np.zeros((max(2 * self._Kt.shape[0], self.s + q), self._Kt.shape[1]))
            grown[:self.s] = self._Kt[:self.s]
            self._Kt = grown
        self._Kt[self.s:self.s + q] = Knew.T
        self.s += q
        rest = np.flatnonzero(~self.chosen)
        Kp = _pad_rows(Knew)[self.idx[rest]]                           # c × r_max × q
        self.S[rest] -= Kp @ np.swapaxes(Kp, 1, 2)

    def add_many(self, gs: np.ndarray) -> np.ndarray:
        """Add the channels ``gs`` in this order, as one block: the same span, basis and explained
        energies as :meth:`add` one at a time, but every product over the ``r`` columns is done once for
        the block (``r × s × Q`` and ``r × Q × m`` matrix products, Q = the block's columns) instead of
        one memory-bound rank-``q`` update per channel. Returns each channel's explained energy (len(gs))."""
        gs = np.asarray(gs, dtype=np.int64)
        out = np.zeros(gs.size)
        slices = [self.w.cols(int(g)) for g in gs]
        self.chosen[gs] = True
        cols = np.concatenate([np.arange(sl.start, sl.stop) for sl in slices]) if gs.size else np.zeros(0, np.int64)
        if cols.size == 0:
            return out
        Kt = self._Kt[:self.s]
        A = self.w.M[:, cols] - Kt.T @ Kt[:, cols]                     # r × Q residual columns of the block
        S = A[cols]                                                    # their residual Gram (Q × Q)
        Q = cols.size
        T = np.zeros((Q, 0))                                           # coefficients of the new basis in A
        owner, local = [], 0
        for j, sl in enumerate(slices):                                # Gram–Schmidt in the block, channel by channel
            q0 = sl.stop - sl.start
            idx = np.arange(local, local + q0)
            local += q0
            if q0 == 0:
                continue
            V = T.T @ S[:, idx]                                        # (basis so far)ᵀ · these columns
            lam, U = np.linalg.eigh(S[np.ix_(idx, idx)] - V.T @ V)
            keep = lam > SPAN_ATOL
            if not keep.any():
                continue
            E = -T @ V                                                 # residual columns' coefficients
            E[idx] += np.eye(q0)
            T = np.hstack([T, E @ (U[:, keep] / np.sqrt(lam[keep]))])
            owner += [j] * int(keep.sum())
        if T.shape[1] == 0:
            return out
        Knew = A @ T                                                   # r × q, orthonormal basis
        pnew = T.T @ self.R[cols]                                      # q × m
        energy = np.einsum("ij,ij->i", pnew, pnew)
        np.add.at(out, np.asarray(owner), energy)
        self.explained += float(energy.sum())
        self._extend(Knew, pnew)
        return out


class _BlockForward:
    """Forward selection on a whitened problem whose columns split into independent blocks (no ``M``
    entry and no output of ``B`` shared across blocks: a channel group's joint problem, one block per
    consumer): one :class:`ForwardState` per block, sharing the chosen channels. A channel's gain is
    the sum of its blocks' gains, exactly as on the whole problem, but every update touches only its
    block's ``r_b × m_b`` and ``r_b × s_b`` arrays instead of the zero-padded ``r × m`` and ``r × s``."""

    def __init__(self, states: list[ForwardState]):
        self.states = states

    @property
    def chosen(self) -> np.ndarray:
        return self.states[0].chosen

    @property
    def explained(self) -> float:
        return float(sum(st.explained for st in self.states))

    def gains(self) -> np.ndarray:
        return np.sum([st.gains() for st in self.states], axis=0)

    def add(self, g: int) -> None:
        for st in self.states:
            st.add(g)

    def add_many(self, gs: np.ndarray) -> np.ndarray:
        return np.sum([st.add_many(gs) for st in self.states], axis=0)


def _independent_blocks(w: Whitened) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """``[(columns, outputs)]``: a split of ``w`` into blocks that no non-zero ``M`` entry and no
    non-zero output of ``B`` links (the connected components, or a coarser split), or ``None`` when it
    is one block. Memory: a few row blocks of booleans (no copy of ``M`` or ``B``)."""
    r, m = w.B.shape
    if r < 2 or m < 2:
        return None
    out_label = np.arange(m)            # each output starts alone; columns join their outputs' label
    col_label = np.full(r, -1)
    merges = 0
    for i in range(r):
        outs = np.flatnonzero(w.B[i])
        if outs.size == 0:
            continue
        labels = np.unique(out_label[outs])
        if labels.size > 1:              # the column links several labels: merge them (rare)
            out_label[np.isin(out_label, labels)] = labels[0]
            col_label[np.isin(col_label, labels)] = labels[0]
            merges += 1
        col_label[i] = labels[0]
        if labels[0] == out_label[0] and merges and np.all(out_label == out_label[0]):
            return None                  # everything is linked already
    loose = col_label < 0                # columns without outputs: their own label until M links them
    col_label[loose] = m + np.flatnonzero(loose)
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    step = max(1, 2**20 // max(r, 1))
    for i in range(0, r, step):         # M entries across labels merge them
        rows, cols = np.nonzero((w.M[i:i + step] != 0) & (col_label[i:i + step, None] != col_label[None, :]))
        for a, b in set(zip(col_label[i + rows].tolist(), col_label[cols].tolist())):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    if parent:
        col_label = np.array([find(int(c)) for c in col_label])
        out_label = np.array([find(int(c)) for c in out_label])
    blocks = [(np.flatnonzero(col_label == c), np.flatnonzero(out_label == c)) for c in np.unique(col_label)]
    return blocks if len(blocks) > 1 else None


def _forward_state(w: Whitened, columns: int | None = None):
    """A :class:`ForwardState`, or a :class:`_BlockForward` when ``w`` splits into independent blocks;
    ``columns`` bounds the basis columns any of them will hold."""
    blocks = _independent_blocks(w)
    if blocks is None:
        return ForwardState(w, columns)
    C = w.n_channels
    states = []
    # A block without outputs explains nothing, whatever is chosen (no M entry links it to the
    # others): its gains stay 0. Dead channels (all-zero columns after a ReLU) make hundreds of such
    # one-column blocks, whose per-step calls dominated the error curves of wide residual groups.
    live = [(cols, outs) for cols, outs in blocks if outs.size]
    for cols, outs in live or blocks[:1]:
        group = w.col_group[cols]
        starts = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=C))]).astype(np.int64)
        sub = Whitened(M=w.M[np.ix_(cols, cols)], B=w.B[np.ix_(cols, outs)], target_sq=w.target_sq,
                       col_group=group, starts=starts)
        states.append(ForwardState(sub, columns))
    return _BlockForward(states)


def _ratio(gain: np.ndarray, cost: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(cost > 0, gain / np.where(cost > 0, cost, 1.0), np.where(gain > 0, np.inf, 0.0))
    return out


def forward_mask(problem: SelectionProblem, k: int | None, budget: float | None, *,
                 start: np.ndarray | None = None, w: Whitened | None = None,
                 deadline: float | None = None) -> np.ndarray:
    """Forward selection from ``start`` (default: nothing) until ``k`` channels / nothing affordable.

    At ``deadline`` (``time.perf_counter``) the rest is filled by the last gains in one go.
    """
    w = w or whiten(problem, lazy=True)        # (one-column groups: M's columns read from the statistics)
    C = problem.n_channels
    # (k channels hold at most the k widest channels' columns: the basis is sized for them up front)
    st = _forward_state(w, None if k is None else int(np.sort(np.diff(w.starts))[::-1][:k].sum()))
    spent = 0.0
    if start is not None:
        for g in np.flatnonzero(start):
            st.add(int(g))
            spent += problem.costs[g]
    limit = C if k is None else k
    batch = max(1, limit // FORWARD_ROUNDS) if C >= FORWARD_BATCH_MIN_CHANNELS else 1
    while st.chosen.sum() < limit:
        gain = st.gains()
        ok = ~st.chosen
        if budget is not None:
            ok &= problem.costs <= budget - spent + 1e-12
        if not ok.any():
            break
        score = _ratio(gain, problem.costs) if budget is not None else gain
        score = np.where(ok, score, -np.inf)
        timed_out = deadline is not None and time.perf_counter() > deadline
        if timed_out or batch > 1:
            # out of time: fill by the last scores; a large group: the next batch by the same scores
            room = limit - int(st.chosen.sum()) if timed_out else min(batch, limit - int(st.chosen.sum()))
            picks = []
            for g in np.argsort(-score, kind="stable"):
                if len(picks) >= room or not np.isfinite(score[g]):
                    break
                if budget is None or problem.costs[g] <= budget - spent + 1e-12:
                    picks.append(int(g))
                    spent += problem.costs[g]
            if timed_out:
                chosen = st.chosen.copy()
                chosen[picks] = True
                return chosen
            st.add_many(np.asarray(picks, np.int64))
            continue
        g = int(np.argmax(score))  # ties: lowest index
        st.add(g)
        spent += problem.costs[g]
    return st.chosen.copy()


def forward_path(problem: SelectionProblem, k_max: int | None = None, *, batch: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The nested forward-selection path: ``(order, errors)``.

    ``order`` (k_max,) lists channels in the order forward selection adds them; ``errors[k − 1]`` is
    the relative refit error of keeping ``order[:k]`` (k = 1 … k_max, default C). One pass gives a
    whole error-vs-width curve (non-increasing), e.g. for :func:`solvers.allocate_budget`.

    ``batch`` > 1: the gains are scored once per ``batch`` channels, which are then added in the order
    of those gains as one block (:meth:`ForwardState.add_many`): every ``errors`` entry is still the
    exact refit error of its prefix (an upper bound of the optimum at that width), the order is greedy
    up to the stale gains within a batch, and the cost falls from ``C`` memory-bound rank-``q`` updates
    of the ``r``-column state to ``C / batch`` matrix products.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InvalidInputError(f"batch must be an integer >= 1; got {batch!r}")
    w = whiten(problem, lazy=True)
    C = problem.n_channels
    k_max = C if k_max is None else problem.check_k(k_max)
    st = _forward_state(w)
    order, errors = [], []
    while len(order) < k_max:
        gain = st.gains()
        if batch == 1:
            g = int(np.argmax(gain))
            st.add(g)
            order.append(g)
            errors.append(max(w.target_sq - st.explained, 0.0) / w.target_sq)
            continue
        take = min(batch, k_max - len(order))
        gs = np.argsort(-gain, kind="stable")[:take]                   # ties: lowest index first
        before = st.explained
        energy = st.add_many(gs)
        order += gs.tolist()
        errors += [max(w.target_sq - e, 0.0) / w.target_sq for e in before + np.cumsum(energy)]
    return np.asarray(order, np.int64), np.minimum.accumulate(np.asarray(errors))


# ------------------------------------------------------------------------------------ backward
def backward_start_fits(w: Whitened) -> bool:
    """Whether a warm start may run :func:`backward_mask` on ``w`` within the statistics' memory: ``M`` an array of
    fewer than ``BACKWARD_START_MAX_COLUMNS`` columns (see there)."""
    return isinstance(w.M, np.ndarray) and w.M.shape[0] < BACKWARD_START_MAX_COLUMNS


def backward_mask(problem: SelectionProblem, k: int | None, budget: float | None, *,
                  w: Whitened | None = None, deadline: float | None = None) -> np.ndarray:
    """Backward elimination from every channel until ``|S| <= k`` and ``Σ cost <= budget``.

    Keeps ``(M + εI)⁻¹`` at full size, downdated in place (removed rows and columns become zero), and
    scores every kept channel at once (batched r_g×r_g solves): O(r²·r_g) per step, one r×r of memory
    (beside the whitened M's, none for a lazy one).
    At ``deadline`` (``time.perf_counter``) it stops scoring one at a time and drops, by the last
    scores, as many channels as still have to go (a time-limited caller still gets a feasible set).
    """
    w = w if w is not None else whiten(problem, lazy=True)
    C = problem.n_channels
    costs = problem.costs
    keep = np.ones(C, dtype=bool)
    r = w.M.shape[0]
    # (M + εI)⁻¹ in one r×r: a fresh M (a lazy one's dense build), the ridge on its diagonal, inverted in place
    # by LAPACK in its own order (np.linalg.inv(M + ε·np.eye(r)) held four: M, the eye, the sum and the inverse)
    A = w.M.copy()
    A[np.diag_indices(r)] += BACKWARD_RIDGE
    Minv = scipy.linalg.inv(A.T, overwrite_a=True, check_finite=False).T if r else A
    del A
    W = Minv @ w.B
    idx = _padded_index(w)
    rmax = idx.shape[1]
    pad = idx == r
    eye_pad = pad[:, :, None] & pad[:, None, :] & np.eye(rmax, dtype=bool)[None]

    def over() -> bool:
        return (k is not None and keep.sum() > k) or (budget is not None and costs[keep].sum() > budget + 1e-12)

    def losses(cand: np.ndarray) -> np.ndarray:
        """tr(W_gᵀ (Minv_gg)⁻¹ W_g) for every candidate (padded directions: identity, zero weight)."""
        safe = np.where(pad[cand], 0, idx[cand])
        live = ~pad[cand]
        if rmax == 1:
            return np.sum(W[safe[:, 0]] ** 2, axis=1) * live[:, 0] / np.where(live[:, 0], Minv[safe[:, 0], safe[:, 0]], 1.0)
        A = Minv[safe[:, :, None], safe[:, None, :]]
        A[~(live[:, :, None] & live[:, None, :])] = 0.0
        A[eye_pad[cand]] = 1.0
        Wg = np.where(live[:, :, None], W[safe], 0.0)
        return np.sum(Wg * np.linalg.solve(A, Wg), axis=(1, 2))

    while over():
        cand = np.flatnonzero(keep)
        loss = losses(cand)
        budget_bound = budget is not None and costs[keep].sum() > budget + 1e-12
        if budget_bound:
            # error increase per unit cost freed (removing a free channel frees nothing: never chosen)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(costs[cand] > 0, loss / np.where(costs[cand] > 0, costs[cand], 1.0), np.inf)
        else:
            score = loss
        if deadline is not None and time.perf_counter() > deadline:
            for g in cand[np.argsort(score, kind="stable")]:          # out of time: drop by the last scores
                if not over():
                    break
                if budget_bound or k is None or keep.sum() > k:
                    keep[g] = False
            break
        g = int(cand[np.argmin(score)])
        pos = np.arange(w.starts[g], w.starts[g + 1])
        if pos.size:
            A = Minv[np.ix_(pos, pos)]
            X = np.linalg.solve(A, Minv[pos])                 # q × r
            W -= Minv[:, pos] @ np.linalg.solve(A, W[pos])
            U = Minv[:, pos].copy()
            subtract_product(Minv, U, X)                      # Minv −= U X, in place
            Minv[pos, :] = 0.0
            Minv[:, pos] = 0.0
            W[pos] = 0.0
        keep[g] = False
    if budget is not None and (k is None or keep.sum() < k):
        keep = forward_mask(problem, k, budget, start=keep, w=w)   # add back what still fits
    return keep


# ------------------------------------------------------------------------------------ swaps
# ------------------------------------------------------------------------------------ methods
def select_greedy(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                  backend: str | None = None, time_limit: float | None = None,
                  seed: int = 0) -> SelectionResult:
    """Forward selection (see the module docstring); ``Status.FEASIBLE``, ``bound=None``.

    ``k`` and/or ``budget`` as in :func:`solvers.select_channels`; at ``time_limit`` (seconds) the
    rest is filled by the last gains and the status is ``TIME_LIMIT``; ``backend`` and ``seed`` are
    accepted for the common signature and unused (k steps of O(d·(s + m)·r) each).
    """
    start = time.perf_counter()
    deadline = None if time_limit is None else start + float(time_limit) - refit_seconds(problem, k)
    mask = forward_mask(problem, k, budget, deadline=deadline)
    return result_from_mask(problem, mask, method="greedy", start=start, iterations=int(mask.sum()),
                            status=_status(deadline))


def _status(deadline: float | None) -> Status:
    return Status.TIME_LIMIT if deadline is not None and time.perf_counter() > deadline else Status.FEASIBLE


def select_backward(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                    backend: str | None = None, time_limit: float | None = None,
                    seed: int = 0) -> SelectionResult:
    """Backward elimination (see the module docstring); ``Status.FEASIBLE``, ``bound=None``.

    ``k`` and/or ``budget`` as in :func:`solvers.select_channels`; at ``time_limit`` (seconds) the
    channels still to go are dropped by the last scores and the status is ``TIME_LIMIT``; ``backend``
    and ``seed`` are accepted for the common signature and unused (C − k steps of O(d²·r) each).
    When even the initial r×r inverse would overrun ``time_limit`` the result is forward selection's,
    with ``TIME_LIMIT`` and ``info["fallback"]`` saying so.
    """
    start = time.perf_counter()
    deadline = None if time_limit is None else start + float(time_limit) - refit_seconds(problem, k)
    w = whiten(problem, lazy=True)
    r = w.M.shape[0]
    if not fits(1.5 * r ** 3, deadline):
        # The r×r inverse backward starts from could not finish in time (e.g. r = 11,008: ~2 min on
        # one core): forward selection instead, flagged, so that the time limit holds.
        mask = forward_mask(problem, k, budget, w=w, deadline=deadline)
        return result_from_mask(problem, mask, method="backward", start=start, iterations=int(mask.sum()),
                                status=Status.TIME_LIMIT,
                                info={"fallback": "forward selection: the r×r inverse would overrun time_limit"})
    mask = backward_mask(problem, k, budget, w=w, deadline=deadline)
    return result_from_mask(problem, mask, method="backward", start=start,
                            iterations=int(problem.n_channels - mask.sum()), status=_status(deadline))


__all__ = ["select_greedy", "select_backward", "forward_mask", "forward_path", "backward_mask", "whiten", "Whitened",
           "densified", "fits", "refit_seconds"]
