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

Greedy proves nothing: results are ``Status.FEASIBLE`` with ``bound=None``. :func:`improve_by_swaps`
(1-swap local search, used to warm-start ``method="exact"``) lives here too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from solvers.selection.baselines import result_from_mask
from solvers.selection.problem import SelectionProblem
from solvers.result import SelectionResult

# Directions of a channel's span with energy below this fraction of the channel's largest are
# treated as zero (the same order as the refit's least-squares cut-off).
WHITEN_RTOL = 1e-12
# Residual energy of a candidate below this (whitened units: a channel direction has energy 1)
# means it is already in the span of the chosen columns.
SPAN_ATOL = 1e-10
# Tiny ridge (whitened units) keeping the backward inverse defined when channels are collinear;
# every reported error is recomputed by an exact refit anyway.
BACKWARD_RIDGE = 1e-10


@dataclass(frozen=True)
class Whitened:
    """A selection problem with each channel's columns orthonormalized (``M_gg = I``).

    Attributes
    ----------
    M : array (r, r)
        Gram of the whitened columns (unit diagonal blocks); ``r = Σ_g rank(G_gg)``.
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
        return _explained(self.M[np.ix_(cm, cm)], self.B[cm])


def _explained(M: np.ndarray, B: np.ndarray) -> float:
    try:
        c = scipy.linalg.cho_factor(M, check_finite=False)
        X = scipy.linalg.cho_solve(c, B, check_finite=False)
    except np.linalg.LinAlgError:
        X = scipy.linalg.lstsq(M, B, cond=1e-12, check_finite=False)[0]
    return float(np.sum(B * X))


def whiten(problem: SelectionProblem) -> Whitened:
    """Orthonormalize each channel's columns (in the ``ZᵀZ`` inner product); refit errors are unchanged.

    For channel ``g`` with ``G_gg = U Λ Uᵀ``, the whitened columns are ``Z_g U Λ^{-1/2}`` (directions
    with ``λ <= WHITEN_RTOL · λ_max`` dropped: they carry no energy). Cost O(Σ_g r_g³ + d²).
    """
    G, Bx, groups, C = problem.gram, problem.cross, problem.groups, problem.n_channels
    transforms, col_group, starts = [], [], [0]
    for g in range(C):
        idx = np.flatnonzero(groups == g)
        lam, U = np.linalg.eigh(G[np.ix_(idx, idx)])
        top = lam.max() if lam.size else 0.0
        keep = lam > WHITEN_RTOL * top if top > 0 else np.zeros(lam.size, bool)
        T = U[:, keep] / np.sqrt(lam[keep])
        transforms.append((idx, T))
        col_group += [g] * T.shape[1]
        starts.append(starts[-1] + T.shape[1])
    r = starts[-1]
    # Whitened = Zᵀ-side transform P (d×r, block diagonal): M = Pᵀ G P, B = Pᵀ B.
    P = np.zeros((G.shape[0], r))
    for g, (idx, T) in enumerate(transforms):
        P[idx, starts[g]:starts[g + 1]] = T
    M = P.T @ G @ P
    M = 0.5 * (M + M.T)
    for g in range(C):  # exact identity blocks (they are, up to round-off)
        s = slice(starts[g], starts[g + 1])
        M[s, s] = np.eye(starts[g + 1] - starts[g])
    return Whitened(M=M, B=P.T @ Bx, target_sq=problem.target_sq, col_group=np.asarray(col_group, np.int64),
                    starts=np.asarray(starts, np.int64))


# ------------------------------------------------------------------------------------ forward
class ForwardState:
    """Gram–Schmidt state of forward selection: chosen channels and every candidate's residuals.

    ``K`` (r × s) holds the inner products of every whitened column with the orthonormal basis of the
    chosen span; ``R`` (r × m) the residual cross-covariance; ``S[g]`` the residual Gram of channel g.
    """

    def __init__(self, w: Whitened):
        self.w = w
        r = w.M.shape[0]
        self.K = np.zeros((r, 0))
        self.R = w.B.copy()
        self.S = [np.eye(w.starts[g + 1] - w.starts[g]) for g in range(w.n_channels)]
        self.chosen = np.zeros(w.n_channels, dtype=bool)
        self.explained = 0.0

    def gains(self) -> np.ndarray:
        """Explained energy each unchosen channel would add (C,); chosen channels get -inf."""
        out = np.full(self.w.n_channels, -np.inf)
        for g in np.flatnonzero(~self.chosen):
            sl = self.w.cols(g)
            Rg = self.R[sl]
            if Rg.shape[0] == 0:
                out[g] = 0.0
                continue
            lam, U = np.linalg.eigh(self.S[g])
            keep = lam > SPAN_ATOL
            P = U[:, keep].T @ Rg
            out[g] = float(np.sum(P * P / lam[keep, None]))
        return out

    def add(self, g: int) -> None:
        sl = self.w.cols(g)
        self.chosen[g] = True
        if sl.stop == sl.start:
            return
        lam, U = np.linalg.eigh(self.S[g])
        keep = lam > SPAN_ATOL
        if not keep.any():
            return
        T = U[:, keep] / np.sqrt(lam[keep])      # S_g^{-1/2} on its range
        Knew = (self.w.M[:, sl] - self.K @ self.K[sl].T) @ T          # r × q
        pnew = T.T @ self.R[sl]                                        # q × m
        self.R -= Knew @ pnew
        self.explained += float(np.sum(pnew * pnew))
        self.K = np.hstack([self.K, Knew])
        for h in np.flatnonzero(~self.chosen):
            sh = self.w.cols(h)
            self.S[h] = self.S[h] - Knew[sh] @ Knew[sh].T


def _ratio(gain: np.ndarray, cost: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(cost > 0, gain / np.where(cost > 0, cost, 1.0), np.where(gain > 0, np.inf, 0.0))
    return out


def forward_mask(problem: SelectionProblem, k: int | None, budget: float | None, *,
                 start: np.ndarray | None = None, w: Whitened | None = None) -> np.ndarray:
    """Forward selection from ``start`` (default: nothing) until ``k`` channels / nothing affordable."""
    w = w or whiten(problem)
    C = problem.n_channels
    st = ForwardState(w)
    spent = 0.0
    if start is not None:
        for g in np.flatnonzero(start):
            st.add(int(g))
            spent += problem.costs[g]
    limit = C if k is None else k
    while st.chosen.sum() < limit:
        gain = st.gains()
        ok = ~st.chosen
        if budget is not None:
            ok &= problem.costs <= budget - spent + 1e-12
        if not ok.any():
            break
        score = _ratio(gain, problem.costs) if budget is not None else gain
        score = np.where(ok, score, -np.inf)
        g = int(np.argmax(score))  # ties: lowest index
        st.add(g)
        spent += problem.costs[g]
    return st.chosen.copy()


def forward_path(problem: SelectionProblem, k_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The nested forward-selection path: ``(order, errors)``.

    ``order`` (k_max,) lists channels in the order forward selection adds them; ``errors[k − 1]`` is
    the relative refit error of keeping ``order[:k]`` (k = 1 … k_max, default C). One pass gives a
    whole error-vs-width curve (non-increasing), e.g. for :func:`solvers.allocate_budget`.
    """
    w = whiten(problem)
    C = problem.n_channels
    k_max = C if k_max is None else problem.check_k(k_max)
    st = ForwardState(w)
    order, errors = [], []
    for _ in range(k_max):
        g = int(np.argmax(st.gains()))
        st.add(g)
        order.append(g)
        errors.append(max(w.target_sq - st.explained, 0.0) / w.target_sq)
    return np.asarray(order, np.int64), np.minimum.accumulate(np.asarray(errors))


# ------------------------------------------------------------------------------------ backward
def backward_mask(problem: SelectionProblem, k: int | None, budget: float | None, *,
                  w: Whitened | None = None) -> np.ndarray:
    """Backward elimination from every channel until ``|S| <= k`` and ``Σ cost <= budget``."""
    w = w or whiten(problem)
    C = problem.n_channels
    costs = problem.costs
    keep = np.ones(C, dtype=bool)
    cols = np.arange(w.M.shape[0])
    Minv = np.linalg.inv(w.M + BACKWARD_RIDGE * np.eye(w.M.shape[0]))
    W = Minv @ w.B
    def over() -> bool:
        return (k is not None and keep.sum() > k) or (budget is not None and costs[keep].sum() > budget + 1e-12)
    while over():
        cand = np.flatnonzero(keep)
        loss = np.empty(cand.size)
        for i, g in enumerate(cand):
            pos = np.flatnonzero(w.col_group[cols] == g)
            if pos.size == 0:
                loss[i] = 0.0
                continue
            A = Minv[np.ix_(pos, pos)]
            Wg = W[pos]
            loss[i] = float(np.sum(Wg * np.linalg.solve(A, Wg)))
        if budget is not None and costs[keep].sum() > budget + 1e-12:
            # error increase per unit cost freed (removing a free channel frees nothing: never chosen)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(costs[cand] > 0, loss / np.where(costs[cand] > 0, costs[cand], 1.0), np.inf)
        else:
            score = loss
        g = int(cand[np.argmin(score)])
        pos = np.flatnonzero(w.col_group[cols] == g)
        rest = np.setdiff1d(np.arange(cols.size), pos)
        if pos.size:
            A = Minv[np.ix_(pos, pos)]
            X = np.linalg.solve(A, Minv[pos][:, rest])        # q × rest
            W = W[rest] - Minv[np.ix_(rest, pos)] @ np.linalg.solve(A, W[pos])
            Minv = Minv[np.ix_(rest, rest)] - Minv[np.ix_(rest, pos)] @ X
        cols = cols[rest]
        keep[g] = False
    if budget is not None and (k is None or keep.sum() < k):
        keep = forward_mask(problem, k, budget, start=keep, w=w)   # add back what still fits
    return keep


# ------------------------------------------------------------------------------------ swaps
def improve_by_swaps(problem: SelectionProblem, mask: np.ndarray, *, budget: float | None = None,
                     deadline: float | None = None, w: Whitened | None = None,
                     max_passes: int = 20) -> np.ndarray:
    """1-swap local search: replace one kept channel by one dropped channel while the error drops.

    Keeps ``|S|`` and respects ``Σ cost <= budget``. For each kept channel the inverse of the rest is
    a block downdate, and every candidate's gain is a Schur complement (no refit per candidate).
    Stops at a local optimum, after ``max_passes`` passes, or at ``deadline`` (``time.perf_counter``).
    """
    w = w or whiten(problem)
    costs = problem.costs
    mask = np.asarray(mask, bool).copy()
    base_now = w.explained(mask)
    for _ in range(max_passes):
        improved = False
        for g in np.flatnonzero(mask):
            if deadline is not None and time.perf_counter() > deadline:
                return mask
            rest_mask = mask.copy()
            rest_mask[g] = False
            cs = w.col_mask(rest_mask)
            idx = np.flatnonzero(cs)
            if idx.size:
                Mss = w.M[np.ix_(idx, idx)] + BACKWARD_RIDGE * np.eye(idx.size)
                cf = scipy.linalg.cho_factor(Mss, check_finite=False)
                Ws = scipy.linalg.cho_solve(cf, w.B[idx], check_finite=False)
                base = float(np.sum(w.B[idx] * Ws))
                other = ~cs
                X = scipy.linalg.cho_solve(cf, w.M[np.ix_(idx, other)], check_finite=False)   # s × o
                R = w.B[other] - w.M[np.ix_(other, idx)] @ Ws
                Mo = w.M[np.ix_(other, other)]
                ocols = np.flatnonzero(other)
            else:
                base, R, ocols = 0.0, w.B, np.arange(w.M.shape[0])
                X, Mo, idx = None, w.M, idx
            free_budget = None if budget is None else budget - costs[rest_mask].sum()
            best_gain, best_h = base_now - base + 1e-12 * w.target_sq, -1
            for h in np.flatnonzero(~mask):
                if free_budget is not None and costs[h] > free_budget + 1e-12:
                    continue
                pos = np.flatnonzero(w.col_group[ocols] == h)
                if pos.size == 0:
                    continue
                Sg = Mo[np.ix_(pos, pos)]
                if X is not None:
                    Sg = Sg - w.M[np.ix_(ocols[pos], idx)] @ X[:, pos]
                lam, U = np.linalg.eigh(Sg)
                ok = lam > SPAN_ATOL
                P = U[:, ok].T @ R[pos]
                gain = float(np.sum(P * P / lam[ok, None]))
                if gain > best_gain:
                    best_gain, best_h = gain, h
            if best_h >= 0:
                mask[g], mask[best_h] = False, True
                base_now = base + best_gain
                improved = True
        if not improved:
            break
    return mask


# ------------------------------------------------------------------------------------ methods
def select_greedy(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                  backend: str | None = None, time_limit: float | None = None,
                  seed: int = 0) -> SelectionResult:
    """Forward selection (see the module docstring); ``Status.FEASIBLE``, ``bound=None``.

    ``k`` and/or ``budget`` as in :func:`solvers.select_channels`; ``backend``, ``time_limit`` and
    ``seed`` are accepted for the common signature and unused (k steps of O(d·(s + m)·r) each).
    """
    start = time.perf_counter()
    mask = forward_mask(problem, k, budget)
    return result_from_mask(problem, mask, method="greedy", start=start, iterations=int(mask.sum()))


def select_backward(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                    backend: str | None = None, time_limit: float | None = None,
                    seed: int = 0) -> SelectionResult:
    """Backward elimination (see the module docstring); ``Status.FEASIBLE``, ``bound=None``.

    ``k`` and/or ``budget`` as in :func:`solvers.select_channels`; ``backend``, ``time_limit`` and
    ``seed`` are accepted for the common signature and unused (C − k steps of O(d²·r) each).
    """
    start = time.perf_counter()
    mask = backward_mask(problem, k, budget)
    return result_from_mask(problem, mask, method="backward", start=start,
                            iterations=int(problem.n_channels - mask.sum()))


__all__ = ["select_greedy", "select_backward", "forward_mask", "forward_path", "backward_mask", "improve_by_swaps",
           "whiten", "Whitened"]
