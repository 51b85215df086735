"""MILP encoding of a ReLU network over an input region (big-M with per-neuron bounds).

Variables (one column each): the inputs ``x`` (box bounds), optionally ``t ≥ |x − c|`` for an L1 ball,
then per hidden block ``i`` the post-activations ``a`` of every neuron that is not stably inactive,
one binary ``δ`` per unstable neuron and (default) one pre-activation column ``z = W h + b ∈ [l, u]``
per unstable neuron (else ``z`` is substituted into the two rows that use it; the explicit column
halves the nonzeros and made HiGHS markedly faster on the 256×4 MNIST nets):

* stable inactive (``u <= 0``): no column, and its column of the next block's weights is ignored;
* stable active (``l >= 0``): ``a = z`` (one row, ``a ∈ [l, u]``);
* unstable: ``a ≥ z``, ``a ≤ z − l(1 − δ)``, ``a ≤ u δ``, ``a ∈ [0, u]``, ``δ ∈ {0, 1}``.

Residual skips add their columns to the same rows; a max pool ``h = max_e z_e`` gets a column per
``z`` and per output and, in each window not decided by the bounds, one binary per element that can
win (:func:`_add_maxpool`: exact, big-M from the pre-activation bounds).

Zero weights (pruned neurons) cost nothing: the rows are CSR built from the blocks' CSR weights.
The model is a set of flat arrays (:class:`MilpModel`); :func:`solve_highs` passes them to highspy
in one ``passModel`` call, :func:`build_pyomo` turns them into a Pyomo ``ConcreteModel`` for any
Pyomo solver.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from solvers.errors import InvalidInputError, SolverError
from solvers.network.ir import as_blocks
from solvers.network.layers import pool_split
from solvers.network.spec import Region, make_region
from solvers.result import Status, relative_gap


@dataclass(frozen=True)
class MilpModel:
    """``min cost·v + offset`` s.t. ``row_lower <= A v <= row_upper``, ``col_lower <= v <= col_upper``,
    ``v_j`` integer where ``integrality[j]``.

    Attributes
    ----------
    A : csr_matrix (n_constraints, n_vars)
    x_cols : int array (n_inputs,)
        Columns of the network inputs.
    unit_cols : list of int arrays
        Per hidden block, the column of each neuron's post-activation (``-1``: constant zero).
    binary_cols : list of int arrays
        Per hidden block, the column of each neuron's binary (``-1``: stable, no binary).
    out_map : (csr_matrix (n_outputs, n_vars), float array (n_outputs,))
        The network output as ``out_map[0] @ v + out_map[1]``.
    build_time : float
        Seconds spent building the arrays.
    """

    cost: np.ndarray
    offset: float
    A: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integrality: np.ndarray
    x_cols: np.ndarray
    unit_cols: list
    binary_cols: list
    out_map: tuple
    build_time: float = 0.0
    info: dict = field(default_factory=dict, compare=False)

    @property
    def n_vars(self) -> int:
        return int(self.col_lower.size)

    @property
    def n_binaries(self) -> int:
        return int(np.count_nonzero(self.integrality))

    @property
    def n_constraints(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_nonzeros(self) -> int:
        return int(self.A.nnz)

    def input_of(self, values: np.ndarray) -> np.ndarray:
        """The network input (n_inputs,) part of a full solution vector (n_vars,)."""
        return np.asarray(values, dtype=np.float64)[self.x_cols]

    def with_objective(self, c, d: float = 0.0) -> "MilpModel":
        """The same model minimizing ``c @ y + d`` (``y`` the network output, ``c`` (n_outputs,))."""
        M, bias = self.out_map
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if c.shape != (M.shape[0],):
            raise InvalidInputError(f"c must have shape ({M.shape[0]},); got {c.shape}")
        cost = np.asarray(M.T @ c).reshape(-1)
        return replace(self, cost=cost, offset=float(c @ bias + d))

    def with_output_constraints(self, C, b) -> "MilpModel":
        """The same model with extra rows ``C @ y <= b`` (``C`` (k, n_outputs), ``b`` (k,))."""
        M, bias = self.out_map
        C = np.atleast_2d(np.asarray(C, dtype=np.float64))
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        if C.shape[1] != M.shape[0] or b.shape != (C.shape[0],):
            raise InvalidInputError(f"C must be (k, {M.shape[0]}) with b (k,); got {C.shape} and {b.shape}")
        rows = sp.csr_matrix(C @ M)
        A = sp.vstack([self.A, rows], format="csr")
        return replace(self, A=A, row_lower=np.concatenate([self.row_lower, np.full(C.shape[0], -np.inf)]),
                       row_upper=np.concatenate([self.row_upper, b - C @ bias]))


def _csr(rows, cols, vals, shape) -> sp.csr_matrix:
    return sp.csr_matrix((vals, (rows, cols)), shape=shape)


def build_milp(network, pre_lower, pre_upper, region: Region | None = None, *, lower=None, upper=None,
               l1_center=None, l1_radius=None, preact_vars: bool = True) -> MilpModel:
    """Encode ``network`` on the input region with pre-activation bounds (zero objective).

    ``pre_lower[i]``, ``pre_upper[i]`` (float64 arrays of shape ``(n_i,)``, one pair per affine block,
    the last for the output) bound ``z_i``; any sound bounds will do (e.g. ``Bounds.lower``/``.upper``
    of :mod:`mipprune.verification.bounds`). Pass the region as a :class:`~solvers.network.spec.Region` or as ``lower``/``upper`` (n_inputs,) and
    optionally ``l1_center``/``l1_radius``. Set an objective with :meth:`MilpModel.with_objective`.
    The number of binaries equals the number of unstable hidden neurons (``l < 0 < u``).
    ``preact_vars=True`` adds a column ``z ∈ [l, u]`` per unstable neuron (one dense row ``z = W h + b``
    instead of two), fewer nonzeros for the same model.
    """
    t0 = time.perf_counter()
    blocks = as_blocks(network)
    n_in = blocks[0].shape[1]
    if region is None:
        region = make_region(n_in, lower, upper, l1_center, l1_radius)
    pre_lower = [np.asarray(l, dtype=np.float64) for l in pre_lower]
    pre_upper = [np.asarray(u, dtype=np.float64) for u in pre_upper]
    if len(pre_lower) != len(blocks) or len(pre_upper) != len(blocks):
        raise InvalidInputError(f"bounds must cover {len(blocks)} blocks; got {len(pre_lower)} lower and "
                                f"{len(pre_upper)} upper")
    for i, (blk, l, u) in enumerate(zip(blocks, pre_lower, pre_upper)):
        if l.shape != (blk.shape[0],) or u.shape != (blk.shape[0],):
            raise InvalidInputError(f"bounds of block {i} must have shape ({blk.shape[0]},); got {l.shape}")
        if i < len(blocks) - 1 and not (np.all(np.isfinite(l)) and np.all(np.isfinite(u))):
            raise InvalidInputError(f"bounds of block {i} must be finite for a big-M encoding; got inf or NaN")

    col_lo = [region.lower]
    col_hi = [region.upper]
    integ = [np.zeros(n_in, dtype=np.uint8)]
    ncol = n_in
    x_cols = np.arange(n_in)
    # rows as COO pieces, with their bounds
    R: list[np.ndarray] = []
    Cc: list[np.ndarray] = []
    V: list[np.ndarray] = []
    rlo: list[np.ndarray] = []
    rhi: list[np.ndarray] = []
    nrow = 0

    def add_rows(r, c, v, lo_, hi_):
        nonlocal nrow
        R.append(np.asarray(r) + nrow)
        Cc.append(np.asarray(c))
        V.append(np.asarray(v, dtype=np.float64))
        rlo.append(np.asarray(lo_, dtype=np.float64))
        rhi.append(np.asarray(hi_, dtype=np.float64))
        nrow += len(lo_)

    if region.has_l1:   # t ≥ x − c, t ≥ c − x, Σ t ≤ r
        c = region.l1_center
        t_cols = np.arange(n_in, 2 * n_in)
        col_lo.append(np.zeros(n_in))
        col_hi.append(np.maximum(np.abs(region.upper - c), np.abs(region.lower - c)))
        integ.append(np.zeros(n_in, dtype=np.uint8))
        ncol += n_in
        k = np.arange(n_in)
        add_rows(np.concatenate([k, k]), np.concatenate([x_cols, t_cols]),
                 np.concatenate([np.ones(n_in), -np.ones(n_in)]), np.full(n_in, -np.inf), c)
        add_rows(np.concatenate([k, k]), np.concatenate([x_cols, t_cols]),
                 np.concatenate([-np.ones(n_in), -np.ones(n_in)]), np.full(n_in, -np.inf), -c)
        add_rows(np.zeros(n_in, dtype=int), t_cols, np.ones(n_in), [-np.inf], [region.l1_radius])

    h_cols = [x_cols]    # per activation h_k, the column of each unit (−1: constant zero)
    z_cols: list[np.ndarray] = []
    unit_cols: list[np.ndarray] = []
    binary_cols: list[np.ndarray] = []
    pool_binaries = 0
    pool_cols: dict[int, tuple] = {}   # pool block → (binary columns, their window, their element)
    for i, blk in enumerate(blocks[:-1]):
        l, u = pre_lower[i], pre_upper[i]
        Ws, srcs = blk.stacked(i)
        prev_cols = np.concatenate([h_cols[k] for k in srcs])
        W = Ws.tocoo()
        live_in = prev_cols[W.col] >= 0
        Wr, Wc, Wv = W.row[live_in], prev_cols[W.col[live_in]], W.data[live_in]
        if blk.pool is not None:   # exact max pooling: one binary per window element that can win
            n = l.size
            z_col = ncol + np.arange(n)
            ncol += n
            col_lo.append(l)
            col_hi.append(u)
            integ.append(np.zeros(n, dtype=np.uint8))
            add_rows(np.concatenate([Wr, np.arange(n)]), np.concatenate([Wc, z_col]),
                     np.concatenate([-Wv, np.ones(n)]), blk.bias, blk.bias)   # z − W h = b
            ncol, pc = _add_maxpool(blk.pool, l, u, z_col, ncol, col_lo, col_hi, integ, add_rows, h_cols)
            pool_binaries += pc[0].size
            pool_cols[i] = pc
            z_cols.append(z_col)
            unit_cols.append(h_cols[-1])
            binary_cols.append(np.full(n, -1))
            continue
        active, unstable = (l >= 0) & (u > 0), (l < 0) & (u > 0)
        alive = active | unstable
        n = l.size
        a_col = np.full(n, -1)
        a_col[alive] = ncol + np.arange(int(alive.sum()))
        ncol += int(alive.sum())
        d_col = np.full(n, -1)
        d_col[unstable] = ncol + np.arange(int(unstable.sum()))
        ncol += int(unstable.sum())
        col_lo += [np.where(active, l, 0.0)[alive], np.zeros(int(unstable.sum()))]
        col_hi += [u[alive], np.ones(int(unstable.sum()))]
        integ += [np.zeros(int(alive.sum()), dtype=np.uint8), np.ones(int(unstable.sum()), dtype=np.uint8)]

        # row index of each neuron within a family of rows (−1: neuron not in it)
        def family(mask):
            idx = np.full(n, -1)
            idx[mask] = np.arange(int(mask.sum()))
            return idx

        fa, fu = family(active), family(unstable)
        b = blk.bias
        # active: a − W h = b
        sel = active[Wr]
        add_rows(np.concatenate([fa[Wr[sel]], fa[active]]), np.concatenate([Wc[sel], a_col[active]]),
                 np.concatenate([-Wv[sel], np.ones(int(active.sum()))]), b[active], b[active])
        sel = unstable[Wr]
        ku = np.flatnonzero(unstable)
        lu, uu, bu = l[ku], u[ku], b[ku]
        nu = ku.size
        if preact_vars:   # z = W h + b once, then short ReLU rows on z
            z_col = ncol + np.arange(nu)
            ncol += nu
            col_lo.append(lu)
            col_hi.append(uu)
            integ.append(np.zeros(nu, dtype=np.uint8))
            z_cols.append(z_col)
            add_rows(np.concatenate([fu[Wr[sel]], np.arange(nu)]), np.concatenate([Wc[sel], z_col]),
                     np.concatenate([-Wv[sel], np.ones(nu)]), bu, bu)
            rr, zc, zv, off = np.arange(nu), z_col, -np.ones(nu), np.zeros(nu)
        else:
            z_cols.append(np.zeros(0, int))
            rr, zc, zv, off = fu[Wr[sel]], Wc[sel], -Wv[sel], bu
        # a − z ≥ 0, i.e. a − W h ≥ b
        add_rows(np.concatenate([rr, np.arange(nu)]), np.concatenate([zc, a_col[ku]]),
                 np.concatenate([zv, np.ones(nu)]), off, np.full(nu, np.inf))
        # a − z − l δ ≤ −l, i.e. a − W h − l δ ≤ b − l
        add_rows(np.concatenate([rr, np.arange(nu), np.arange(nu)]),
                 np.concatenate([zc, a_col[ku], d_col[ku]]),
                 np.concatenate([zv, np.ones(nu), -lu]), np.full(nu, -np.inf), off - lu)
        # a − u δ ≤ 0
        add_rows(np.concatenate([np.arange(nu), np.arange(nu)]), np.concatenate([a_col[ku], d_col[ku]]),
                 np.concatenate([np.ones(nu), -uu]), np.full(nu, -np.inf), np.zeros(nu))
        unit_cols.append(a_col)
        binary_cols.append(d_col)
        h_cols.append(a_col)

    A = _csr(np.concatenate(R) if R else np.zeros(0, int), np.concatenate(Cc) if Cc else np.zeros(0, int),
             np.concatenate(V) if V else np.zeros(0), (nrow, ncol))
    A.sum_duplicates()
    last = blocks[-1]
    Ws, srcs = last.stacked(len(blocks) - 1)
    prev_cols = np.concatenate([h_cols[k] for k in srcs])
    W = Ws.tocoo()
    keep = prev_cols[W.col] >= 0
    M = _csr(W.row[keep], prev_cols[W.col[keep]], W.data[keep], (last.shape[0], ncol))
    model = MilpModel(
        cost=np.zeros(ncol), offset=0.0, A=A,
        row_lower=np.concatenate(rlo) if rlo else np.zeros(0), row_upper=np.concatenate(rhi) if rhi else np.zeros(0),
        col_lower=np.concatenate(col_lo), col_upper=np.concatenate(col_hi), integrality=np.concatenate(integ),
        x_cols=x_cols, unit_cols=unit_cols, binary_cols=binary_cols, out_map=(M, last.bias.copy()),
        info={"t_cols": np.arange(n_in, 2 * n_in) if region.has_l1 else None, "l1_center": region.l1_center,
              "z_cols": z_cols, "pool_binaries": pool_binaries,
              "pool_cols": pool_cols})
    return replace(model, build_time=time.perf_counter() - t0)


def _add_maxpool(pool, l, u, z_col, ncol, col_lo, col_hi, integ, add_rows, h_cols) -> tuple[int, tuple]:
    """Exact ``h_j = max_{e ∈ window j} z_e`` (Tjeng et al. 2019): ``h >= z_e`` for every element that
    can win (``u_e > l_star``, :func:`~solvers.network.layers.pool_split`), and with one binary ``δ_e``
    per such element ``h <= z_e + (U_j − l_e)(1 − δ_e)``, ``Σ_e δ_e = 1`` (``U_j = max u``). A window
    with a single possible winner is ``h = z_star`` (no binary). Returns ``(ncol, (binary columns, their
    window, their element))``."""
    star, gap, lo_h, hi_h = pool_split(l, u, pool)
    nh = pool.shape[0]
    h_col = ncol + np.arange(nh)
    ncol += nh
    col_lo.append(lo_h)
    col_hi.append(hi_h)
    integ.append(np.zeros(nh, dtype=np.uint8))
    h_cols.append(h_col)
    # candidates: unique (window, element) pairs that can be the max
    pairs = np.unique(np.stack([np.repeat(np.arange(nh), pool.shape[1]), pool.ravel()], 1), axis=0)
    j, e = pairs[:, 0], pairs[:, 1]
    cand = (u[e] > l[star[j]]) | (e == star[j])
    decided = gap[j] <= 0
    # decided windows: h − z_star = 0
    dj = np.flatnonzero(gap <= 0)
    if dj.size:
        add_rows(np.concatenate([np.arange(dj.size)] * 2), np.concatenate([h_col[dj], z_col[star[dj]]]),
                 np.concatenate([np.ones(dj.size), -np.ones(dj.size)]), np.zeros(dj.size), np.zeros(dj.size))
    sel = cand & ~decided
    j, e = j[sel], e[sel]
    nc = j.size
    if nc == 0:
        return ncol, (np.zeros(0, int), j, e)
    k = np.arange(nc)
    # h − z_e ≥ 0
    add_rows(np.concatenate([k, k]), np.concatenate([h_col[j], z_col[e]]),
             np.concatenate([np.ones(nc), -np.ones(nc)]), np.zeros(nc), np.full(nc, np.inf))
    d_col = ncol + k
    ncol += nc
    col_lo.append(np.zeros(nc))
    col_hi.append(np.ones(nc))
    integ.append(np.ones(nc, dtype=np.uint8))
    big = hi_h[j] - l[e]
    # h − z_e + (U − l_e) δ_e ≤ U − l_e
    add_rows(np.concatenate([k, k, k]), np.concatenate([h_col[j], z_col[e], d_col]),
             np.concatenate([np.ones(nc), -np.ones(nc), big]), np.full(nc, -np.inf), big)
    # Σ_e δ_e = 1 per open window
    wins, row = np.unique(j, return_inverse=True)
    add_rows(row, d_col, np.ones(nc), np.ones(wins.size), np.ones(wins.size))
    return ncol, (d_col, j, e)


# --------------------------------------------------------------------------- HiGHS
@dataclass(frozen=True)
class MilpSolution:
    """Outcome of one MILP solve (a minimization).

    ``status``: OPTIMAL, FEASIBLE (stopped at a target/cutoff with a solution), TIME_LIMIT,
    INFEASIBLE (no point, or none below the cutoff), NO_SOLUTION, ERROR. ``bound`` is the proven dual
    bound (``None`` if none), ``values`` the best solution vector (n_vars,) or ``None``.
    """

    status: Status
    objective: float | None
    bound: float | None
    values: np.ndarray | None
    nodes: int
    time: float
    raw_status: str = ""

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def _set(h, name: str, value) -> None:
    import highspy

    if h.setOptionValue(name, value) != highspy.HighsStatus.kOk:
        raise SolverError(f"HiGHS rejected option {name}={value!r}")


def to_highs(model: MilpModel, *, options: dict | None = None):
    """A silent ``highspy.Highs`` holding ``model`` (passed in one ``passModel`` call)."""
    import highspy

    h = highspy.Highs()
    _set(h, "output_flag", False)
    for k, v in (options or {}).items():
        _set(h, k, v)
    inf = highspy.kHighsInf
    A = model.A.tocsc()
    status = h.passModel(
        model.n_vars, model.n_constraints, int(A.nnz), 1, 1, float(model.offset),
        model.cost.astype(np.float64), np.nan_to_num(model.col_lower, neginf=-inf, posinf=inf),
        np.nan_to_num(model.col_upper, neginf=-inf, posinf=inf),
        np.nan_to_num(model.row_lower, neginf=-inf, posinf=inf),
        np.nan_to_num(model.row_upper, neginf=-inf, posinf=inf),
        A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data.astype(np.float64),
        model.integrality.astype(np.int32))
    if status == highspy.HighsStatus.kError:
        raise SolverError("HiGHS rejected the MILP model (passModel returned an error)")
    return h


def solve_highs(model: MilpModel, *, time_limit: float | None = None, cutoff: float | None = None,
                target: float | None = None, first_feasible: bool = False, start: np.ndarray | None = None,
                options: dict | None = None) -> MilpSolution:
    """Minimize ``model`` with HiGHS.

    Parameters
    ----------
    time_limit : float, optional
        Seconds.
    cutoff : float, optional
        Only points with objective ``<= cutoff`` are sought (HiGHS ``objective_bound``); if there is
        none, the status is INFEASIBLE — a proof that the minimum exceeds ``cutoff``.
    target : float, optional
        Stop at the first point with objective ``<= target`` (HiGHS ``objective_target``): FEASIBLE.
    first_feasible : bool
        Stop at the first feasible point (``mip_max_improving_sols = 1``): FEASIBLE.
    start : array (n_vars,), optional
        A full solution vector offered as the incumbent.
    """
    import highspy

    t0 = time.perf_counter()
    opts = dict(options or {})
    if time_limit is not None:
        opts["time_limit"] = max(float(time_limit), 1e-3)
    if cutoff is not None:
        opts["objective_bound"] = float(cutoff)
    if target is not None:
        opts["objective_target"] = float(target)
    if first_feasible:
        opts["mip_max_improving_sols"] = 1
    h = to_highs(model, options=opts)
    if start is not None:
        start = np.asarray(start, dtype=np.float64)
        if start.shape != (model.n_vars,):
            raise InvalidInputError(f"start must have shape ({model.n_vars},); got {start.shape}")
        h.setSolution(model.n_vars, np.arange(model.n_vars, dtype=np.int32), start)
    run = h.run()
    ms = h.getModelStatus()
    S = highspy.HighsModelStatus
    info = h.getInfo()
    has_sol = info.primal_solution_status == 2   # kSolutionStatusFeasible
    values = np.array(h.getSolution().col_value) if has_sol else None
    is_mip = model.n_binaries > 0
    obj = float(info.objective_function_value) if has_sol else None
    bound = None
    nodes = int(info.mip_node_count) if is_mip else 0
    if ms == S.kOptimal:
        status = Status.OPTIMAL
        if is_mip:
            db = float(info.mip_dual_bound)
            bound = db if np.isfinite(db) else obj
            # HiGHS also says "optimal" when the cutoff pruned every node: the incumbent (above the
            # cutoff) is then not proven optimal, only the bound is
            tol = max(float(h.getOptionValue("mip_abs_gap")[1]),
                      float(h.getOptionValue("mip_rel_gap")[1]) * abs(obj or 0.0))
            if cutoff is not None and obj is not None and obj > cutoff and obj - bound > tol + 1e-12:
                status = Status.FEASIBLE
        else:
            bound = obj
    elif ms in (S.kInfeasible, S.kObjectiveBound):
        status, values, obj = Status.INFEASIBLE, None, None
    elif ms in (S.kObjectiveTarget, S.kSolutionLimit):
        status = Status.FEASIBLE if has_sol else Status.NO_SOLUTION
    elif ms == S.kTimeLimit:
        status = Status.TIME_LIMIT
    elif ms in (S.kInterrupt, S.kIterationLimit) and has_sol:
        status = Status.FEASIBLE
    elif ms in (S.kInterrupt, S.kIterationLimit):
        status = Status.NO_SOLUTION
    else:
        status = Status.ERROR
    if status in (Status.TIME_LIMIT, Status.FEASIBLE) and is_mip:
        db = float(info.mip_dual_bound)
        bound = db if np.isfinite(db) and abs(db) < 1e30 else None
    if run == highspy.HighsStatus.kError and status not in (Status.INFEASIBLE,):
        status = Status.ERROR
    return MilpSolution(status, obj, bound, values, nodes, time.perf_counter() - t0, h.modelStatusToString(ms))


# --------------------------------------------------------------------------- Pyomo
def build_pyomo(model: MilpModel):
    """The same MILP as a Pyomo ``ConcreteModel`` (variables ``v``, rows ``c``, objective ``obj``).

    Hand it to any Pyomo solver, e.g. ``pyo.SolverFactory("appsi_highs").solve(m)``; the network
    input is ``[m.v[j].value for j in model.x_cols]``.
    """
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    n = model.n_vars
    m.J = pyo.RangeSet(0, n - 1)

    def _bounds(_m, j):
        lo, hi = model.col_lower[j], model.col_upper[j]
        return (None if not np.isfinite(lo) else float(lo), None if not np.isfinite(hi) else float(hi))

    def _domain(_m, j):
        return pyo.Binary if model.integrality[j] and model.col_lower[j] >= 0 and model.col_upper[j] <= 1 \
            else (pyo.Integers if model.integrality[j] else pyo.Reals)

    m.v = pyo.Var(m.J, domain=_domain, bounds=_bounds)
    A = model.A
    m.I = pyo.RangeSet(0, A.shape[0] - 1) if A.shape[0] else pyo.Set(initialize=[])

    def _row(_m, i):
        lo, hi = model.row_lower[i], model.row_upper[i]
        s, e = A.indptr[i], A.indptr[i + 1]
        body = sum(float(A.data[k]) * _m.v[int(A.indices[k])] for k in range(s, e))
        if lo == hi:
            return body == float(lo)
        return pyo.inequality(None if not np.isfinite(lo) else float(lo), body,
                              None if not np.isfinite(hi) else float(hi))

    m.c = pyo.Constraint(m.I, rule=_row)
    nz = np.flatnonzero(model.cost)
    m.obj = pyo.Objective(expr=sum(float(model.cost[j]) * m.v[int(j)] for j in nz) + float(model.offset),
                          sense=pyo.minimize)
    return m


__all__ = ["MilpModel", "MilpSolution", "build_milp", "solve_highs", "to_highs", "build_pyomo"]


def solve_pyomo(model: MilpModel, solver: str = "appsi_highs", *, time_limit: float | None = None) -> MilpSolution:
    """Minimize ``model`` through Pyomo's ``SolverFactory(solver)`` (no cutoff: solved to optimality).

    ``bound`` is the solver's reported lower bound when finite (the objective itself when OPTIMAL).
    """
    import pyomo.environ as pyo
    from pyomo.opt import TerminationCondition as TC

    t0 = time.perf_counter()
    m = build_pyomo(model)
    opt = pyo.SolverFactory(solver)
    kw = {"load_solutions": False}
    if time_limit is not None:
        kw["timelimit"] = max(float(time_limit), 1e-3)
    try:
        res = opt.solve(m, **kw)
    except Exception as exc:   # solver crashed: report, never guess
        raise SolverError(f"Pyomo solver {solver!r} failed: {exc}") from exc
    tc = res.solver.termination_condition
    values = obj = bound = None
    if tc in (TC.optimal, TC.maxTimeLimit, TC.feasible, TC.locallyOptimal):
        try:
            m.solutions.load_from(res)
            values = np.array([m.v[j].value if m.v[j].value is not None else np.nan for j in range(model.n_vars)])
            obj = float(pyo.value(m.obj))
        except Exception:   # no solution loaded (e.g. time limit before any incumbent)
            values = obj = None
    lb = getattr(res.problem, "lower_bound", None)
    lb = float(lb) if lb is not None and np.isfinite(float(lb)) else None
    if tc == TC.optimal and obj is not None:
        status, bound = Status.OPTIMAL, lb if lb is not None and lb <= obj else obj
    elif tc in (TC.infeasible, TC.infeasibleOrUnbounded):
        status = Status.INFEASIBLE
    elif tc == TC.maxTimeLimit:
        status, bound = Status.TIME_LIMIT, lb
    elif obj is not None:
        status, bound = Status.FEASIBLE, lb
    else:
        status = Status.ERROR
    return MilpSolution(status, obj, bound, values, 0, time.perf_counter() - t0, str(tc))


def solution_from_input(model: MilpModel, network, x) -> np.ndarray:
    """The full MILP solution vector (n_vars,) of the network's forward pass at input ``x``.

    Feasible for the model whenever ``x`` is in the region and the bounds are sound; useful as a
    warm start and to test the encoding.
    """
    blocks = as_blocks(network)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    v = np.zeros(model.n_vars)
    v[model.x_cols] = x
    hs = [x]
    for i, blk in enumerate(blocks[:-1]):
        z = sum(W @ hs[k] for k, W in blk.terms(i)) + blk.bias
        if blk.pool is not None:
            h = z[blk.pool].max(axis=1)
            v[model.info["z_cols"][i]] = z
            v[model.unit_cols[i]] = h
            d_col, j, e = model.info["pool_cols"][i]
            wins = z[e] >= h[j]
            first = np.zeros_like(wins)
            _, at = np.unique(np.where(wins, j, -1), return_index=True)   # one winner per window
            first[at[np.where(wins, j, -1)[at] >= 0]] = True
            v[d_col] = first.astype(float)
            hs.append(h)
            continue
        h = np.maximum(z, 0.0)
        ac, dc = model.unit_cols[i], model.binary_cols[i]
        v[ac[ac >= 0]] = h[ac >= 0]
        v[dc[dc >= 0]] = (z[dc >= 0] > 0).astype(float)
        if model.info["z_cols"][i].size:
            v[model.info["z_cols"][i]] = z[dc >= 0]
        hs.append(h)
    if model.info.get("t_cols") is not None:
        tc = model.info["t_cols"]
        v[tc] = np.abs(x - model.info["l1_center"])
    return v


__all__ += ["solve_pyomo", "solution_from_input"]
