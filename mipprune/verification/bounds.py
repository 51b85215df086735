"""Pre-activation bounds of a ReLU network over an input region (box, optionally ∩ an L1 ball).

Three methods, each at least as tight as the one before it on every neuron:

* ``"interval"`` — interval arithmetic (IBP).
* ``"crown"`` — linear back-substitution with per-neuron ReLU relaxations (CROWN / DeepPoly: upper
  line ``u(z − l)/(u − l)``, lower slope 1 if ``u >= −l`` else 0), concretized exactly over the box
  ∩ L1 ball, then intersected with IBP.
* ``"lp"`` — CROWN, then each unstable neuron's bounds tightened layer by layer by the LP relaxation
  (the triangle relaxation of every earlier ReLU with its current bounds) on HiGHS; one highspy model
  grows by one layer at a time and only its objective changes between neurons.

The network is seen through :meth:`Network.to_affine_relu`: blocks ``A_0 … A_L`` with
``z_i = A_i(h_i, earlier h_k)`` (residual skips), ``h_0 = x``, ``h_{i+1} = ReLU(z_i)`` or a max pool
of ``z_i``; the output is ``z_L``. Max pools: CROWN uses ``h >= z_star`` and the exact line where
the window is decided, else ``h <= max u``; the LP has ``h >= z_e`` for every window element and
``h <= z_star + gap`` (:func:`solvers.network.layers.pool_split`). ``Bounds.lower[i]`` and
``Bounds.upper[i]`` bound ``z_i`` (so the last pair bounds the output).

:func:`linear_lower_bound` bounds a linear function of a block's output (e.g. the property margin
``y_label − y_j``) by back-substituting it directly, much tighter than differencing output bounds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from solvers.errors import InvalidInputError, SolverError
from solvers.network.layers import AffineBlock, pool_split
from solvers.network.ir import as_blocks
from solvers.network.spec import Region, make_region

METHODS = ("interval", "crown", "lp")


@dataclass
class Bounds:
    """Per-block pre-activation bounds.

    Attributes
    ----------
    lower, upper : list of float64 arrays
        ``lower[i]``, ``upper[i]`` (each of shape ``(n_i,)``, ``n_i`` = rows of block ``i``) bound
        ``z_i = A_i h_i``; ``i = 0 … L``, the last pair bounds the network output.
    method : str
        ``"interval"``, ``"crown"`` or ``"lp"``.
    time : float
        Wall-clock seconds spent computing them.
    complete : bool
        ``False`` when a time limit stopped LP tightening early (the bounds are still sound).
    info : dict
        Method details, e.g. ``lp_solves`` and ``lp_time`` for ``"lp"``.
    """

    lower: list
    upper: list
    method: str
    time: float = 0.0
    complete: bool = True
    info: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Number of blocks (hidden ReLU layers + 1)."""
        return len(self.lower)

    def unstable(self, i: int) -> np.ndarray:
        """Boolean mask of neurons of block ``i`` whose sign is not fixed (``l < 0 < u``)."""
        return (self.lower[i] < 0) & (self.upper[i] > 0)

    def n_unstable(self) -> list[int]:
        """Unstable neurons per hidden block (the output block is not a ReLU layer)."""
        return [int(np.count_nonzero(self.unstable(i))) for i in range(self.n_layers - 1)]

    def copy(self) -> "Bounds":
        return Bounds([l.copy() for l in self.lower], [u.copy() for u in self.upper], self.method,
                      self.time, self.complete, dict(self.info))


# --------------------------------------------------------------------------- validation
# --------------------------------------------------------------------------- concretization
def concretize_argmin(Lam: np.ndarray, region: Region) -> np.ndarray:
    """A minimizer (m, n) over the region of each row of ``Lam @ x`` (see :func:`concretize_lower`)."""
    lo, hi = region.lower, region.upper
    if not region.has_l1:
        return np.where(Lam > 0, lo, hi)
    c = region.l1_center
    p = np.clip(c, lo, hi)
    budget = max(region.l1_radius - float(np.abs(p - c).sum()), 0.0)
    cap = np.where(Lam > 0, p - lo, hi - p)
    order = np.argsort(-np.abs(Lam), axis=1, kind="stable")
    k = np.take_along_axis(cap, order, axis=1)
    taken_sorted = np.clip(budget - (np.cumsum(k, axis=1) - k), 0.0, k)
    taken = np.empty_like(taken_sorted)
    np.put_along_axis(taken, order, taken_sorted, axis=1)
    return np.clip(p - np.sign(Lam) * taken, lo, hi)


def concretize_lower(Lam: np.ndarray, const: np.ndarray, region: Region) -> np.ndarray:
    """Exact ``min`` of each row of ``Lam @ x + const`` over the region. ``Lam`` (m, n), ``const`` (m,).

    Over the box alone it is ``Λ⁺l + Λ⁻u``. With an L1 ball the minimum over box ∩ ball is a
    fractional knapsack: start at the box point nearest the centre, then spend the remaining radius on
    the coordinates with the largest ``|Λ_ij|`` first (each up to its box bound).
    """
    lo, hi = region.lower, region.upper
    box = np.maximum(Lam, 0) @ lo + np.minimum(Lam, 0) @ hi + const
    if not region.has_l1 or Lam.shape[0] == 0:
        return box
    c = region.l1_center
    p = np.clip(c, lo, hi)
    budget = max(region.l1_radius - float(np.abs(p - c).sum()), 0.0)
    cap = np.where(Lam > 0, p - lo, hi - p)           # how far each coordinate may move downhill
    gain = np.abs(Lam)
    order = np.argsort(-gain, axis=1, kind="stable")
    g = np.take_along_axis(gain, order, axis=1)
    k = np.take_along_axis(cap, order, axis=1)
    before = np.cumsum(k, axis=1) - k
    taken = np.clip(budget - before, 0.0, k)
    ball = Lam @ p + const - (g * taken).sum(axis=1)
    return np.maximum(box, ball)  # both are valid; the knapsack is exact, max guards round-off


# --------------------------------------------------------------------------- interval
def _interval_block(blocks: Sequence[AffineBlock], i: int, hl: Sequence[np.ndarray], hu: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds of ``z_i`` from bounds ``hl[k] <= h_k <= hu[k]`` of every activation it reads."""
    blk = blocks[i]
    c, r = blk.bias.copy(), np.zeros(blk.shape[0])
    for k, W in blk.terms(i):
        mid, rad = (hu[k] + hl[k]) / 2, (hu[k] - hl[k]) / 2
        c = c + W @ mid
        r = r + abs(W) @ rad
    return c - r, c + r


def act_bounds(blk: AffineBlock, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of ``h_{i+1}`` (ReLU or max pool of ``z_i``) from bounds ``l, u`` of ``z_i``."""
    if blk.pool is None:
        return np.maximum(l, 0), np.maximum(u, 0)
    _, _, lo, hi = pool_split(l, u, blk.pool)
    return lo, hi


def _h_bounds(blocks, lower, upper, region: Region) -> tuple[list, list]:
    hl, hu = [region.lower], [region.upper]
    for j in range(len(lower)):
        if j < len(blocks) - 1:
            a, b = act_bounds(blocks[j], lower[j], upper[j])
            hl.append(a)
            hu.append(b)
    return hl, hu


# --------------------------------------------------------------------------- CROWN
def relu_relaxation(l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-neuron linear relaxation ``α z <= ReLU(z) <= s z + t`` on ``[l, u]``.

    Stable active: ``α = s = 1``; stable inactive: all 0; unstable: ``s = u/(u−l)``, ``t = −s l`` and
    the adaptive lower slope ``α = 1`` if ``u >= −l`` else ``0`` (CROWN's choice, smaller area).
    """
    active = l >= 0
    unstable = (l < 0) & (u > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_un = np.where(unstable, u / np.where(unstable, u - l, 1.0), 0.0)
    s = np.where(active, 1.0, s_un)
    t = np.where(unstable, -s_un * l, 0.0)
    alpha = np.where(active, 1.0, np.where(unstable & (u >= -l), 1.0, 0.0))
    return alpha, s, t


def _relax_back(blk: AffineBlock, l: np.ndarray, u: np.ndarray, nu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Back through ``h = act(z)``: the coefficient ``nu`` (m, |h|) on ``h`` becomes one on ``z`` (m, n_z),
    plus a constant (m,), such that ``nu h >= Lz z + const`` for every ``z`` in ``[l, u]``.

    Max pool: ``h >= z_star`` (the window element with the largest lower bound) for positive
    coefficients; for negative ones ``h <= z_star + gap`` where the window is decided (gap 0: exact),
    else ``h <= max u`` (the linear line is looser there by ``u_star − l_star``)."""
    if blk.pool is None:
        alpha, s, t = relu_relaxation(l, u)
        pos, neg = np.maximum(nu, 0), np.minimum(nu, 0)
        return pos * alpha + neg * s, neg @ t
    star, gap, _, hi = pool_split(l, u, blk.pool)
    tau = (gap == 0).astype(np.float64)
    pos, neg = np.maximum(nu, 0), np.minimum(nu, 0)
    S = sp.csr_matrix((np.ones(star.size), (np.arange(star.size), star)), shape=(star.size, l.size))
    Lz = np.asarray((S.T @ (pos + neg * tau).T).T)
    return Lz, neg @ (tau * gap + (1 - tau) * hi)


def _backsubstitute(blocks: Sequence[AffineBlock], lower: Sequence[np.ndarray], upper: Sequence[np.ndarray],
                    layer: int, C: np.ndarray, d: np.ndarray, region: Region, return_lam: bool = False):
    """Lower bound of ``C @ z_layer + d`` over the region, relaxing the activations ``0 … layer−1``
    with ``lower[j], upper[j]``. ``C`` (m, n_layer), ``d`` (m,); returns (m,).

    Over a DAG (residual skips): the coefficients of every activation ``h_k`` are accumulated from
    all blocks that read it before ``h_k`` is relaxed (blocks are visited last to first)."""
    m = C.shape[0]
    Lh: dict[int, np.ndarray] = {}
    Lz, const = C, np.asarray(d, dtype=np.float64).copy()
    for i in range(layer, -1, -1):
        blk = blocks[i]
        const = const + Lz @ blk.bias
        for k, W in blk.terms(i):
            contrib = np.asarray((W.T @ Lz.T).T)
            Lh[k] = Lh[k] + contrib if k in Lh else contrib
        if i == 0:
            break
        nu = Lh.pop(i, None)
        if nu is None:    # nothing later reads h_i
            Lz = np.zeros((m, blocks[i - 1].shape[0]))
            continue
        Lz, c = _relax_back(blocks[i - 1], lower[i - 1], upper[i - 1], nu)
        const = const + c
    Lam = Lh.pop(0)
    lb = concretize_lower(Lam, const, region)
    return (lb, Lam) if return_lam else lb


def _crown_layer(blocks, lower, upper, i: int, region: Region, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """CROWN bounds of block ``i``'s neurons (only ``rows``, an index array, when given: the others get
    ``∓inf``, i.e. no information)."""
    n = blocks[i].shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    k = rows.size
    E = np.zeros((k, n))
    E[np.arange(k), rows] = 1.0
    lb = _backsubstitute(blocks, lower, upper, i, np.vstack([E, -E]), np.zeros(2 * k), region) if k else np.zeros(0)
    cl, cu = np.full(n, -np.inf), np.full(n, np.inf)
    cl[rows], cu[rows] = lb[:k], -lb[k:]
    return cl, cu


def linear_lower_bound(network, bounds: Bounds, C, d=None, *, region: Region | None = None,
                       lower=None, upper=None, l1_center=None, l1_radius=None, return_points: bool = False):
    """CROWN lower bound of ``C @ y + d`` over the region, ``y`` the network output (last block).

    ``C`` (m, n_outputs), ``d`` (m,) (default 0). Uses ``bounds`` for every hidden ReLU. Pass either
    ``region`` or ``lower``/``upper`` (and optionally the L1 ball). Returns (m,) lower bounds; an upper
    bound of ``C y + d`` is ``−linear_lower_bound(…, −C, −d)``. With ``return_points`` also the
    minimizers (m, n_inputs) of the linear lower bounds: cheap candidate points for an attack.
    """
    blocks = as_blocks(network)
    if region is None:
        region = make_region(blocks[0].shape[1], lower, upper, l1_center, l1_radius)
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    n_out = blocks[-1].shape[0]
    if C.shape[1] != n_out:
        raise InvalidInputError(f"C must have {n_out} columns (one per network output); got shape {C.shape}")
    d = np.zeros(C.shape[0]) if d is None else np.asarray(d, dtype=np.float64).reshape(-1)
    if d.shape != (C.shape[0],):
        raise InvalidInputError(f"d must have shape ({C.shape[0]},); got {d.shape}")
    lb, Lam = _backsubstitute(blocks, bounds.lower, bounds.upper, len(blocks) - 1, C, d, region, return_lam=True)
    # never worse than what the output bounds give by interval reasoning
    ibp = np.maximum(C, 0) @ bounds.lower[-1] + np.minimum(C, 0) @ bounds.upper[-1] + d
    lb = np.maximum(lb, ibp)
    return (lb, concretize_argmin(Lam, region)) if return_points else lb


# --------------------------------------------------------------------------- LP tightening
_LP_TOL = 1e-7   # slack subtracted from LP optima (simplex tolerances) so the bounds stay sound


class _TriangleLP:
    """The LP relaxation (triangle per unstable ReLU) grown one hidden layer at a time on one Highs."""

    def __init__(self, region: Region):
        import highspy

        self.hs = highspy
        h = highspy.Highs()
        for name, value in (("output_flag", False), ("presolve", "off"), ("threads", 1)):
            if h.setOptionValue(name, value) != highspy.HighsStatus.kOk:
                raise SolverError(f"HiGHS rejected option {name}={value!r}")
        self.h = h
        self.inf = highspy.kHighsInf
        n = region.lower.size
        self.n_inputs = n
        h.addCols(n, np.zeros(n), region.lower, region.upper, 0, np.zeros(0, np.int32), np.zeros(0, np.int32),
                  np.zeros(0))
        if region.has_l1:   # t ≥ |x − c|, Σ t ≤ r
            c = region.l1_center
            tmax = np.maximum(np.abs(region.upper - c), np.abs(region.lower - c))
            h.addCols(n, np.zeros(n), np.zeros(n), tmax, 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
            xi, ti = np.arange(n), np.arange(n, 2 * n)
            idx = np.stack([xi, ti], 1).ravel().astype(np.int32)
            starts = np.arange(0, 2 * n, 2, dtype=np.int32)
            # x − t ≤ c and −x − t ≤ −c
            h.addRows(n, np.full(n, -self.inf), c, 2 * n, starts, idx, np.tile([1.0, -1.0], n))
            h.addRows(n, np.full(n, -self.inf), -c, 2 * n, starts, idx, np.tile([-1.0, -1.0], n))
            h.addRows(1, np.array([-self.inf]), np.array([region.l1_radius]), n, np.zeros(1, np.int32),
                      ti.astype(np.int32), np.ones(n))
        self.hcols = [np.arange(n)]     # per activation h_k, the column of each coordinate (−1: constant 0)
        self.cost_cols = np.zeros(0, np.int32)

    def source_cols(self, srcs) -> np.ndarray:
        """Columns of ``concat(h_k for k in srcs)`` (the column order of :meth:`AffineBlock.stacked`)."""
        return np.concatenate([self.hcols[k] for k in srcs])

    def add_layer(self, i: int, blk: AffineBlock, l: np.ndarray, u: np.ndarray) -> None:
        """Append block ``i``: ``h = ReLU(z)`` with the triangle relaxation on ``[l, u]`` (or the max-pool
        relaxation), ``z`` the block's affine map of the activations it reads."""
        if blk.pool is not None:
            return self._add_pool(i, blk, l, u)
        h, inf = self.h, self.inf
        Ws, srcs = blk.stacked(i)
        W = self._restrict(Ws, self.source_cols(srcs))     # columns of live units only
        active, unstable = (l >= 0) & (u > 0), (l < 0) & (u > 0)
        live = np.flatnonzero(active | unstable)
        base = h.getNumCol()
        newcol = np.full(l.size, -1)
        newcol[live] = base + np.arange(live.size)
        h.addCols(live.size, np.zeros(live.size), np.maximum(l[live], 0), np.maximum(u[live], 0), 0,
                  np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
        rows = []   # (sparse row over previous cols, coefficient on own col, lo, hi)
        a_idx = np.flatnonzero(active)
        if a_idx.size:   # h = W h_prev + b  →  −W h_prev + h = b
            rows.append((-W[a_idx], newcol[a_idx], blk.bias[a_idx], blk.bias[a_idx]))
        u_idx = np.flatnonzero(unstable)
        nu = u_idx.size
        if nu:   # a column z = W h_prev + b per unstable neuron: one dense row instead of two
            zcol = h.getNumCol() + np.arange(nu)
            h.addCols(nu, np.zeros(nu), l[u_idx], u[u_idx], 0, np.zeros(0, np.int32), np.zeros(0, np.int32),
                      np.zeros(0))
            bu = blk.bias[u_idx]
            rows.append((-W[u_idx], zcol, bu, bu))
        for M, own, lo_r, hi_r in rows:
            M = self._with_own(M, own)
            h.addRows(M.shape[0], np.asarray(lo_r, float), np.asarray(hi_r, float), M.nnz,
                      M.indptr[:-1].astype(np.int32), M.indices.astype(np.int32), M.data.astype(np.float64))
        if nu:
            s = u[u_idx] / (u[u_idx] - l[u_idx])
            own = newcol[u_idx]
            r = np.repeat(np.arange(nu), 2).astype(np.int32)
            starts = np.arange(0, 2 * nu, 2, dtype=np.int32)
            idx = np.stack([own, zcol], 1).ravel().astype(np.int32)
            # h − z ≥ 0  and  h − s z ≤ −s l
            h.addRows(nu, np.zeros(nu), np.full(nu, inf), 2 * nu, starts, idx, np.tile([1.0, -1.0], nu))
            h.addRows(nu, np.full(nu, -inf), -s * l[u_idx], 2 * nu, starts, idx,
                      np.stack([np.ones(nu), -s], 1).ravel())
        self.hcols.append(newcol)

    def _add_pool(self, i: int, blk: AffineBlock, l: np.ndarray, u: np.ndarray) -> None:
        """Max pool: a column per ``z`` (= its affine map), a column per output ``h ∈ [max l, max u]``,
        ``h >= z_e`` for every window element and ``h <= z_star + gap`` (:func:`pool_split`)."""
        h, inf = self.h, self.inf
        Ws, srcs = blk.stacked(i)
        W = self._restrict(Ws, self.source_cols(srcs))
        nz, nh = l.size, blk.pool.shape[0]
        zcol = h.getNumCol() + np.arange(nz)
        h.addCols(nz, np.zeros(nz), l, u, 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
        M = self._with_own(-W, zcol)
        h.addRows(nz, blk.bias, blk.bias, M.nnz, M.indptr[:-1].astype(np.int32), M.indices.astype(np.int32),
                  M.data.astype(np.float64))
        star, gap, lo_h, hi_h = pool_split(l, u, blk.pool)
        hcol = h.getNumCol() + np.arange(nh)
        h.addCols(nh, np.zeros(nh), lo_h, hi_h, 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
        pairs = np.unique(np.stack([np.repeat(np.arange(nh), blk.pool.shape[1]), blk.pool.ravel()], 1), axis=0)
        npair = pairs.shape[0]
        idx = np.stack([hcol[pairs[:, 0]], zcol[pairs[:, 1]]], 1).ravel().astype(np.int32)
        h.addRows(npair, np.zeros(npair), np.full(npair, inf), 2 * npair, np.arange(0, 2 * npair, 2, dtype=np.int32),
                  idx, np.tile([1.0, -1.0], npair))
        idx = np.stack([hcol, zcol[star]], 1).ravel().astype(np.int32)
        h.addRows(nh, np.full(nh, -inf), gap, 2 * nh, np.arange(0, 2 * nh, 2, dtype=np.int32), idx,
                  np.tile([1.0, -1.0], nh))
        self.hcols.append(hcol)

    def _restrict(self, W: sp.csr_matrix, cols: np.ndarray) -> sp.csr_matrix:
        """Map the columns of ``W`` (units of the activations it reads, LP columns ``cols``) to LP
        columns, dropping constant-zero units (column −1)."""
        keep = cols >= 0
        Wc = W.tocsc()[:, np.flatnonzero(keep)].tocoo()
        return sp.csr_matrix((Wc.data, (Wc.row, cols[keep][Wc.col])), shape=(W.shape[0], self.h.getNumCol()))

    def _with_own(self, M: sp.csr_matrix, own: np.ndarray) -> sp.csr_matrix:
        ncol = self.h.getNumCol()
        M = sp.csr_matrix((M.data, M.indices, M.indptr), shape=(M.shape[0], ncol))
        return (M + sp.csr_matrix((np.ones(own.size), (np.arange(own.size), own)), shape=(M.shape[0], ncol))).tocsr()

    def set_objective(self, coef_row: sp.csr_matrix, cols: np.ndarray | None = None) -> None:
        """Minimize ``coef_row @ h`` (coef_row: (1, n_units) over units in LP columns ``cols``; default
        the last activation added)."""
        h = self.h
        if self.cost_cols.size:
            h.changeColsCost(self.cost_cols.size, self.cost_cols, np.zeros(self.cost_cols.size))
        r = self._restrict(sp.csr_matrix(coef_row), self.hcols[-1] if cols is None else cols)
        cols = r.indices.astype(np.int32)
        h.changeColsCost(cols.size, cols, r.data.astype(np.float64))
        self.cost_cols = cols

    def input_point(self) -> np.ndarray:
        """The input part ``x`` of the last LP solution."""
        return np.array(self.h.getSolution().col_value[: self.n_inputs])

    def minimize(self, time_left: float | None) -> float | None:
        """Solve; the optimum (lowered by a tolerance) or ``None`` if not solved to optimality."""
        h = self.h
        if time_left is not None:   # HiGHS compares time_limit with the run time summed over all runs
            h.setOptionValue("time_limit", h.getRunTime() + max(float(time_left), 1e-3))
        h.run()
        if h.getModelStatus() != self.hs.HighsModelStatus.kOptimal:
            return None
        v = h.getInfo().objective_function_value
        return v - _LP_TOL * (1.0 + abs(v))


def _lp_tighten_layer(lp: _TriangleLP, blocks, i: int, lo: np.ndarray, hi: np.ndarray, deadline: float | None,
                      which: np.ndarray) -> tuple[int, bool]:
    """Tighten ``lo``/``hi`` (in place) of the neurons ``which`` of block ``i``; returns (solves, finished)."""
    n_solves = 0
    blk = blocks[i]
    W, srcs = blk.stacked(i)
    cols = lp.source_cols(srcs)
    for k in which:
        for sign in (1.0, -1.0):
            if sign < 0 and hi[k] <= 0 or sign > 0 and lo[k] >= 0:
                if blk.pool is None or i == len(blocks) - 1:
                    continue   # already decided by the other direction (a ReLU needs only the sign)
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return n_solves, False
            lp.set_objective(sign * W[k], cols)
            v = lp.minimize(left)
            n_solves += 1
            if v is None:
                continue
            v = v + sign * blk.bias[k]
            if sign > 0:
                lo[k] = max(lo[k], v)
            else:
                hi[k] = min(hi[k], -v)
    return n_solves, True


def lp_linear_lower_bound(network, bounds: Bounds, C, d=None, *, region: Region,
                          time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LP-relaxation lower bounds of each row of ``C @ y + d`` (``y`` the output) and the minimizers.

    The LP is the triangle relaxation of every hidden ReLU with ``bounds``; it is never looser than
    :func:`linear_lower_bound` (the CROWN value is kept where larger, or where a solve is cut short).
    Returns ``(lb (m,), X (m, n_inputs))``; a row of ``X`` is the LP optimum's input (a good attack
    start), or NaN where the LP was not solved.
    """
    t0 = time.perf_counter()
    blocks = as_blocks(network)
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    d = np.zeros(C.shape[0]) if d is None else np.asarray(d, dtype=np.float64).reshape(-1)
    lb = linear_lower_bound(blocks, bounds, C, d, region=region)
    X = np.full((C.shape[0], region.lower.size), np.nan)
    lp = _TriangleLP(region)
    for j in range(len(blocks) - 1):
        lp.add_layer(j, blocks[j], bounds.lower[j], bounds.upper[j])
    last = blocks[-1]
    W_last, srcs = last.stacked(len(blocks) - 1)
    cols = lp.source_cols(srcs)
    for r in range(C.shape[0]):
        left = None if time_limit is None else t0 + time_limit - time.perf_counter()
        if left is not None and left <= 0:
            break
        lp.set_objective(sp.csr_matrix(np.asarray(W_last.T @ C[r]).reshape(1, -1)), cols)
        v = lp.minimize(left)
        if v is None:
            continue
        X[r] = lp.input_point()
        lb[r] = max(lb[r], v + C[r] @ last.bias + d[r])
    return lb, X


# --------------------------------------------------------------------------- entry point
def compute_bounds(network, lower, upper, method: str = "crown", *, l1_center=None, l1_radius=None,
                   time_limit: float | None = None) -> Bounds:
    """Sound pre-activation bounds of every block of ``network`` over the input region.

    Parameters
    ----------
    network : Network (or its list of AffineBlock)
    lower, upper : array (n_inputs,)
        Input box.
    method : {"interval", "crown", "lp"}
    l1_center, l1_radius : optional
        Intersect the box with the L1 ball ``‖x − l1_center‖₁ <= l1_radius``.
    time_limit : float, optional
        Seconds for ``"lp"``; when it runs out the remaining neurons keep their CROWN bounds.

    Returns
    -------
    Bounds with ``lower[i]``, ``upper[i]`` of shape ``(n_i,)`` for each block ``i``.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {list(METHODS)}; got {method!r}")
    if time_limit is not None and not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0 seconds; got {time_limit}")
    blocks = as_blocks(network)
    region = make_region(blocks[0].shape[1], lower, upper, l1_center, l1_radius)
    deadline = None if time_limit is None else t0 + time_limit
    start = None
    if method == "lp":   # CROWN is not monotone in the intermediate bounds: keep its own result as a floor
        start = _compute(blocks, region, "crown", t0, None)
    return _compute(blocks, region, method, t0, deadline, start=start)


def _compute(blocks, region: Region, method: str, t0: float, deadline: float | None,
             start: Bounds | None = None) -> Bounds:
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    complete = True
    lp = None
    n_solves = 0
    t_lp = 0.0
    hl, hu = [region.lower], [region.upper]
    L = len(blocks) - 1
    for i, blk in enumerate(blocks):
        if i == 0:
            lo, hi = _interval_block(blocks, 0, hl, hu)
            if region.has_l1 and method != "interval":
                lo = np.maximum(lo, concretize_lower(blk.weight.toarray(), blk.bias, region))
                hi = np.minimum(hi, -concretize_lower(-blk.weight.toarray(), -blk.bias, region))
        else:
            lo, hi = _interval_block(blocks, i, hl, hu)
            if method != "interval":
                # a ReLU that interval bounds already decide keeps its relaxation exact whatever its
                # CROWN bounds: back-substitute only the others (OVAL21 deep: most of the rows)
                rows = np.flatnonzero((lo < 0) & (hi > 0)) if (blk.pool is None and i < L) else None
                cl, cu = _crown_layer(blocks, lower, upper, i, region, rows)
                lo, hi = np.maximum(lo, cl), np.minimum(hi, cu)
        if start is not None:   # never looser than bounds already known
            lo, hi = np.maximum(lo, start.lower[i]), np.minimum(hi, start.upper[i])
        if method == "lp" and i > 0 and complete:
            tl = time.perf_counter()
            if lp is None:
                lp = _TriangleLP(region)
                for j in range(i):
                    lp.add_layer(j, blocks[j], lower[j], upper[j])
            if i == L:
                which = np.arange(lo.size)
            elif blk.pool is None:
                which = np.flatnonzero((lo < 0) & (hi > 0))
            else:   # the elements of undecided windows (their bounds set the big-M of the MILP)
                _, gap, _, _ = pool_split(np.minimum(lo, hi), hi, blk.pool)
                which = np.unique(blk.pool[gap > 0])
            ns, complete = _lp_tighten_layer(lp, blocks, i, lo, hi, deadline, which)
            n_solves += ns
            t_lp += time.perf_counter() - tl
        lo = np.minimum(lo, hi)   # round-off guard: never cross
        lower.append(lo)
        upper.append(hi)
        if i < L:
            a, b = act_bounds(blk, lo, hi)
            hl.append(a)
            hu.append(b)
        if lp is not None and complete and i < L:
            lp.add_layer(i, blk, lo, hi)
    info = {"lp_solves": n_solves, "lp_time": t_lp} if method == "lp" else {}
    return Bounds(lower, upper, method, time.perf_counter() - t0, complete, info)


def tighten_with_lp(network, bounds: Bounds, region: Region, *, time_limit: float | None = None) -> Bounds:
    """LP-tighten existing (e.g. CROWN) bounds; the result is never looser than ``bounds``."""
    t0 = time.perf_counter()
    blocks = as_blocks(network)
    deadline = None if time_limit is None else t0 + time_limit
    return _compute(blocks, region, "lp", t0, deadline, start=bounds)


__all__ = ["Bounds", "compute_bounds", "linear_lower_bound", "lp_linear_lower_bound", "tighten_with_lp",
           "concretize_lower", "concretize_argmin", "relu_relaxation", "METHODS"]
