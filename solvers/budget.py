"""Network-wide width allocation: choose each layer's number of kept channels to hit a FLOPs / params
target while minimizing the summed selection error.

The network is a chain of :class:`LayerBudget` entries. Entry ``l`` owns a width ``w_l`` (its output
channels: prunable, ``1 <= w_l <= C_l``, or fixed at ``C_l``) and its input width is the previous
entry's width (or a constant ``in_channels`` for the first layer / after an unprunable boundary).
Its cost is

    cost_l = a_l · w_in · w_l + b_l · w_l + c_l          (a: per channel pair, b: per channel, c: fixed)

— e.g. a conv with a k×k kernel on an H×W output: ``a = k²·H·W`` multiply–accumulates, ``b = H·W``
(bias). The total is a sum of bilinear terms in consecutive widths plus linear terms. We pick widths
with ``(1 − tolerance)·target·dense <= total <= target·dense`` minimizing ``Σ_l weight_l·err_l[w_l]``
where ``err_l[k]`` is the layer's selection error when keeping ``k`` channels (its error curve, e.g.
:func:`solvers.selection.greedy.forward_path` or exact solves per k).

Backends
--------
* ``"highs"`` (default): a MILP. One-hot binaries ``x_{l,k}`` per width choice (``w_l = Σ k·x_{l,k}``);
  the product ``w_{l−1}·w_l`` is linearized in the compact aggregated form
  ``u_{l,k} = w_{l−1}·x_{l,k}`` (``Σ_k u_{l,k} = w_{l−1}``, McCormick bounds from the one-hot),
  so ``w_{l−1}·w_l = Σ_k k·u_{l,k}``: C_l continuous variables per coupled pair instead of C_{l−1}·C_l.
* ``"cpsat"`` (OR-Tools CP-SAT): integer widths, ``AddMultiplicationEquality`` for the products,
  ``AddElement`` for the errors. CP-SAT needs integers: errors are scaled by ``ERROR_SCALE`` (1e6) and
  rounded, cost coefficients scaled to integers (exactly when they are integers already). The
  reported objective is recomputed in float from the chosen widths, and the reported bound is the
  solver's bound minus the worst-case rounding (``n_layers · 0.5 / ERROR_SCALE``), so it stays valid.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from solvers.errors import InfeasibleBudgetError, InvalidInputError, SolverError, SolverNotAvailableError
from solvers.result import Status, relative_gap

METRICS = ("flops", "params")
BACKENDS = ("highs", "cpsat")
ERROR_SCALE = 1e6
DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class LayerBudget:
    """One prunable (or fixed) channel dimension of a chain network, with its cost coefficients.

    Attributes
    ----------
    name : str
    n_channels : int
        ``C_l``: the full width (output channels of the layer).
    errors : array (C_l,) or None
        ``errors[k − 1]`` = selection error (relative, dimensionless) of keeping ``k`` channels,
        ``k = 1 … C_l``. ``None`` for an unprunable layer.
    flops_per_pair, flops_per_channel, flops_fixed : float
        FLOPs (or MACs: be consistent) = ``pair · w_in · w_out + channel · w_out + fixed``.
    params_per_pair, params_per_channel, params_fixed : float
        Parameters, same form.
    in_channels : int, optional
        Constant input width (network input, or after an unprunable boundary); ``None`` = the
        previous entry's width (0 for the first entry without one: no bilinear term).
    prunable : bool
        ``False`` fixes the width at ``n_channels`` (e.g. the classifier's outputs).
    weight : float
        Multiplier of this layer's error in the objective (default 1).
    """

    name: str
    n_channels: int
    errors: np.ndarray | None = None
    flops_per_pair: float = 0.0
    flops_per_channel: float = 0.0
    flops_fixed: float = 0.0
    params_per_pair: float = 0.0
    params_per_channel: float = 0.0
    params_fixed: float = 0.0
    in_channels: int | None = None
    prunable: bool = True
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.n_channels, (int, np.integer)) or self.n_channels < 1:
            raise InvalidInputError(f"n_channels of layer {self.name!r} must be an integer >= 1; got {self.n_channels!r}")
        if self.prunable:
            if self.errors is None:
                raise InvalidInputError(f"errors of prunable layer {self.name!r} must be given; got None")
            e = np.asarray(self.errors, dtype=np.float64).reshape(-1)
            if e.shape != (self.n_channels,):
                raise InvalidInputError(
                    f"errors of layer {self.name!r} must have shape ({self.n_channels},) (k = 1..C); got {e.shape}")
            if not np.all(np.isfinite(e)):
                raise InvalidInputError(f"errors of layer {self.name!r} must be finite; got NaN or inf")
            e.setflags(write=False)
            object.__setattr__(self, "errors", e)
        for f in ("flops_per_pair", "flops_per_channel", "flops_fixed", "params_per_pair",
                  "params_per_channel", "params_fixed"):
            v = float(getattr(self, f))
            if not (math.isfinite(v) and v >= 0):
                raise InvalidInputError(f"{f} of layer {self.name!r} must be finite and >= 0; got {v}")
            object.__setattr__(self, f, v)
        if self.in_channels is not None and (not isinstance(self.in_channels, (int, np.integer))
                                             or self.in_channels < 1):
            raise InvalidInputError(f"in_channels of layer {self.name!r} must be an integer >= 1; got {self.in_channels!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise InvalidInputError(f"weight of layer {self.name!r} must be finite and >= 0; got {self.weight}")

    @classmethod
    def conv(cls, name: str, errors, *, out_channels: int, kernel_size: int | tuple[int, int],
             out_hw: tuple[int, int], in_channels: int | None = None, groups_depthwise: bool = False,
             bias: bool = True, prunable: bool = True, weight: float = 1.0) -> "LayerBudget":
        """A 2-D convolution: MACs ``kh·kw·H·W`` per channel pair (+ ``H·W`` per channel with a bias)."""
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        H, W = out_hw
        return cls(name, out_channels, errors, flops_per_pair=kh * kw * H * W,
                   flops_per_channel=H * W if bias else 0.0, params_per_pair=kh * kw,
                   params_per_channel=1.0 if bias else 0.0, in_channels=in_channels, prunable=prunable,
                   weight=weight)

    @classmethod
    def linear(cls, name: str, errors, *, out_features: int, in_features: int | None = None,
               bias: bool = True, prunable: bool = True, weight: float = 1.0) -> "LayerBudget":
        """A fully connected layer: ``in·out`` MACs and weights (+ ``out`` biases)."""
        return cls(name, out_features, errors, flops_per_pair=1.0, flops_per_channel=1.0 if bias else 0.0,
                   params_per_pair=1.0, params_per_channel=1.0 if bias else 0.0, in_channels=in_features,
                   prunable=prunable, weight=weight)

    def coefficients(self, metric: str) -> tuple[float, float, float]:
        if metric == "flops":
            return self.flops_per_pair, self.flops_per_channel, self.flops_fixed
        return self.params_per_pair, self.params_per_channel, self.params_fixed


@dataclass(frozen=True)
class BudgetResult:
    """Outcome of :func:`allocate_budget`.

    Attributes
    ----------
    widths : dict[str, int]
        Kept channels per layer (fixed layers at their full width).
    objective : float
        ``Σ_l weight_l · err_l[w_l]`` recomputed in float64 from ``widths``.
    bound : float or None
        Proven lower bound on the optimal objective (``None`` when none was proven).
    gap : float or None
    status : Status
        OPTIMAL (proven within the solver's gap) or TIME_LIMIT (best allocation found so far).
    flops, params : float
        Totals of the chosen widths; ``dense_flops``, ``dense_params`` at full width.
    ratio : float
        ``total / dense`` of the chosen ``metric``.
    metric, backend : str
    solve_time : float
        Wall-clock seconds.
    """

    widths: dict
    objective: float
    bound: float | None
    gap: float | None
    status: Status
    flops: float
    params: float
    dense_flops: float
    dense_params: float
    ratio: float
    metric: str
    backend: str
    solve_time: float
    info: dict = field(default_factory=dict, compare=False)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops > 0 else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params / self.dense_params if self.dense_params > 0 else 1.0


# ----------------------------------------------------------------------------------- cost model
def _input_width(layers: list[LayerBudget], l: int, widths: list[int]) -> int:
    if layers[l].in_channels is not None:
        return int(layers[l].in_channels)
    return 0 if l == 0 else widths[l - 1]


def total_cost(layers, widths, metric: str = "flops") -> float:
    """Total FLOPs / params of the chain at the given widths (a sequence aligned with ``layers``)."""
    layers = list(layers)
    widths = [int(x) for x in widths]
    tot = 0.0
    for l, L in enumerate(layers):
        a, b, c = L.coefficients(metric)
        tot += a * _input_width(layers, l, widths) * widths[l] + b * widths[l] + c
    return tot


def total_error(layers, widths) -> float:
    """``Σ weight_l · err_l[w_l]`` over prunable layers."""
    return float(sum(L.weight * L.errors[int(w) - 1] for L, w in zip(layers, widths) if L.prunable))


def _validate(layers, target, metric, backend, time_limit, tolerance):
    layers = list(layers)
    if not layers or not all(isinstance(L, LayerBudget) for L in layers):
        raise InvalidInputError("layers must be a non-empty list of LayerBudget; got "
                                f"{type(layers).__name__} of {[type(L).__name__ for L in layers][:3]}")
    names = [L.name for L in layers]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"layer names must be unique; got {names}")
    if isinstance(target, bool) or not isinstance(target, (int, float, np.floating, np.integer)) \
            or not (0 < float(target) <= 1):
        raise InvalidInputError(f"target must be in (0, 1]; got {target}")
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {list(METRICS)}; got {metric!r}")
    if backend not in BACKENDS:
        raise SolverNotAvailableError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    if time_limit is not None and not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0 seconds; got {time_limit}")
    if not (0 <= tolerance < 1):
        raise InvalidInputError(f"tolerance must be in [0, 1); got {tolerance}")
    return layers, float(target)


def allocate_budget(layers, target: float, *, metric: str = "flops", backend: str = "highs",
                    time_limit: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> BudgetResult:
    """Per-layer widths with total ``metric`` in ``[(1 − tolerance)·target, target]·dense``, minimizing error.

    Parameters
    ----------
    layers : list of LayerBudget
        The chain, in order.
    target : float in (0, 1]
        Fraction of the dense FLOPs / params to keep.
    metric : {"flops", "params"}
    backend : {"highs", "cpsat"}
    time_limit : float, optional
        Seconds; on hitting it the best allocation found is returned with ``Status.TIME_LIMIT``.
    tolerance : float
        Width of the accepted window below the target (default 0.005 = 0.5 %).

    Raises
    ------
    InvalidInputError
        Bad layers / target / metric / tolerance.
    InfeasibleBudgetError
        No allocation lands in the window (the message gives the smallest achievable ratio).
    SolverNotAvailableError
        Unknown backend, or OR-Tools missing for ``"cpsat"``.
    SolverError
        The solver stopped without any allocation (e.g. time limit before the first solution).
    """
    start = time.perf_counter()
    layers, target = _validate(layers, target, metric, backend, time_limit, tolerance)
    full = [L.n_channels for L in layers]
    least = [1 if L.prunable else L.n_channels for L in layers]
    dense = total_cost(layers, full, metric)
    if dense <= 0:
        raise InvalidInputError(f"the dense network must have positive {metric}; got {dense}")
    hi = target * dense
    lo = (1.0 - tolerance) * hi
    min_ratio = total_cost(layers, least, metric) / dense
    if min_ratio > target + 1e-12:
        raise InfeasibleBudgetError(
            f"target must be >= {min_ratio:.6g} (the smallest achievable {metric} ratio, one channel per "
            f"prunable layer); got {target:g}")
    if backend == "highs":
        widths, bound, status, info = _solve_highs(layers, metric, lo, hi, time_limit, min_ratio, target)
    else:
        widths, bound, status, info = _solve_cpsat(layers, metric, lo, hi, time_limit, min_ratio, target)
    # Re-check everything in float64 from the chosen widths.
    tot = total_cost(layers, widths, metric)
    if not (lo * (1 - 1e-9) - 1e-9 <= tot <= hi * (1 + 1e-9) + 1e-9):
        raise SolverError(f"{backend} returned widths with {metric} ratio {tot / dense:.6g} outside "
                          f"[{lo / dense:.6g}, {hi / dense:.6g}] (numerical trouble)")
    objective = total_error(layers, widths)
    if bound is not None:
        bound = min(bound, objective)
    gap = relative_gap(objective, bound)
    return BudgetResult(
        widths={L.name: int(w) for L, w in zip(layers, widths)}, objective=objective, bound=bound, gap=gap,
        status=status, flops=total_cost(layers, widths, "flops"), params=total_cost(layers, widths, "params"),
        dense_flops=total_cost(layers, full, "flops"), dense_params=total_cost(layers, full, "params"),
        ratio=tot / dense, metric=metric, backend=backend, solve_time=time.perf_counter() - start, info=info)


def _infeasible(metric, min_ratio, lo_ratio, hi_ratio):
    return InfeasibleBudgetError(
        f"{metric} ratio must land in [{lo_ratio:.6g}, {hi_ratio:.6g}] but no width allocation does "
        f"(smallest achievable ratio {min_ratio:.6g}); widen tolerance or change target")


# ----------------------------------------------------------------------------------- HiGHS MILP
def _solve_highs(layers, metric, lo, hi, time_limit, min_ratio, target):
    import highspy

    inf = highspy.kHighsInf
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 1e-7)
    h.setOptionValue("mip_abs_gap", 1e-9)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    cost_cols: list[int] = []
    cost_vals: list[float] = []
    const = 0.0
    onehot: dict[int, np.ndarray] = {}     # layer -> column indices of x_{l,1..C}
    ncol = 0

    def add_cols(n, lower, upper, obj, integer):
        nonlocal ncol
        idx = np.arange(ncol, ncol + n, dtype=np.int32)
        h.addVars(n, np.full(n, lower, float), np.full(n, upper, float))
        h.changeColsCost(n, idx, np.asarray(obj, float))
        if integer:
            h.changeColsIntegrality(n, idx, np.full(n, highspy.HighsVarType.kInteger))
        ncol += n
        return idx

    for l, L in enumerate(layers):
        if L.prunable:
            x = add_cols(L.n_channels, 0.0, 1.0, L.weight * L.errors, True)
            h.addRow(1.0, 1.0, x.size, x, np.ones(x.size))
            onehot[l] = x
    ks = {l: np.arange(1, layers[l].n_channels + 1, dtype=float) for l in onehot}
    for l, L in enumerate(layers):
        a, b, c = L.coefficients(metric)
        const += c
        # linear part b·w_l
        if l in onehot:
            cost_cols += list(onehot[l])
            cost_vals += list(b * ks[l])
        else:
            const += b * L.n_channels
        if a == 0:
            continue
        prev_var = L.in_channels is None and l > 0 and (l - 1) in onehot
        win_const = None if prev_var else _input_width(layers, l, [M.n_channels for M in layers])
        if win_const is not None:
            if l in onehot:
                cost_cols += list(onehot[l])
                cost_vals += list(a * win_const * ks[l])
            else:
                const += a * win_const * L.n_channels
            continue
        xp, kp = onehot[l - 1], ks[l - 1]          # w_in = Σ kp·xp (a variable)
        Cp = float(layers[l - 1].n_channels)
        if l not in onehot:                        # fixed output width: linear in w_in
            cost_cols += list(xp)
            cost_vals += list(a * L.n_channels * kp)
            continue
        # u_j = w_in · x_{l,j}:  x_j <= u_j <= Cp·x_j,  u_j <= w_in − (1 − x_j),  u_j >= w_in − Cp(1 − x_j)
        x = onehot[l]
        u = add_cols(x.size, 0.0, Cp, np.zeros(x.size), False)
        for j in range(x.size):
            h.addRow(0.0, inf, 2, np.array([u[j], x[j]], np.int32), np.array([1.0, -1.0]))          # u >= x
            h.addRow(-inf, 0.0, 2, np.array([u[j], x[j]], np.int32), np.array([1.0, -Cp]))          # u <= Cp x
            idx = np.r_[u[j], x[j], xp].astype(np.int32)
            h.addRow(-inf, -1.0, idx.size, idx, np.r_[1.0, -1.0, -kp])                            # u - x - w <= -1
            h.addRow(-Cp, inf, idx.size, idx, np.r_[1.0, -Cp, -kp])                               # u - Cp x - w >= -Cp
        idx = np.r_[u, xp].astype(np.int32)
        h.addRow(0.0, 0.0, idx.size, idx, np.r_[np.ones(u.size), -kp])                            # Σ u = w_in
        cost_cols += list(u)
        cost_vals += list(a * ks[l])
    # window on the total: lo <= const + Σ vals·cols <= hi (merge duplicate columns)
    agg: dict[int, float] = {}
    for cidx, v in zip(cost_cols, cost_vals):
        agg[int(cidx)] = agg.get(int(cidx), 0.0) + float(v)
    cols = np.array(sorted(agg), dtype=np.int32)
    vals = np.array([agg[c] for c in cols])
    scale = max(hi, 1.0)                        # rows in units of the budget: better conditioned
    h.addRow((lo - const) / scale, (hi - const) / scale, cols.size, cols, vals / scale)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    S = highspy.HighsModelStatus
    if status == S.kInfeasible:
        raise _infeasible(metric, min_ratio, lo / hi * target, target)
    has_sol = info.primal_solution_status == 2
    if status == S.kOptimal:
        st = Status.OPTIMAL
    elif status in (S.kTimeLimit, S.kInterrupt, S.kSolutionLimit):
        st = Status.TIME_LIMIT
    else:
        raise SolverError(f"HiGHS must solve the allocation MILP; got status {h.modelStatusToString(status)}")
    if not has_sol:
        raise SolverError(f"HiGHS found no width allocation before stopping ({h.modelStatusToString(status)})")
    sol = np.asarray(h.getSolution().col_value)
    widths = []
    for l, L in enumerate(layers):
        widths.append(int(np.argmax(sol[onehot[l]])) + 1 if l in onehot else L.n_channels)
    bound = float(info.mip_dual_bound) if math.isfinite(info.mip_dual_bound) else None
    return widths, bound, st, {"mip_nodes": int(info.mip_node_count), "binaries": int(sum(len(v) for v in onehot.values()))}


# ----------------------------------------------------------------------------------- CP-SAT
def _integer_scale(values) -> tuple[int, bool]:
    """Smallest power of 10 (<= 1e6) making every value integral to 1e-9, and whether one does.

    ``(10**6, False)`` when none does: CP-SAT then solves a rounded model, whose optimum and bound
    prove nothing about the real one (the caller reports neither).
    """
    vals = np.asarray([v for v in values if v != 0], float)
    for p in range(7):
        s = 10 ** p
        if vals.size == 0 or np.all(np.abs(vals * s - np.round(vals * s)) <= 1e-9 * np.maximum(1, np.abs(vals * s))):
            return s, True
    return 10 ** 6, False


class _CpsatProcess:
    """A long-lived ``python -c`` child that runs CP-SAT solves sent over a pipe (pickled).

    OR-Tools bundles its own ``libhighs.so.1``, ABI-incompatible with highspy's: whichever loads
    second fails with undefined symbols. So CP-SAT never runs in this process (the HiGHS backend and
    the MILP verifier live here). A plain subprocess, not ``multiprocessing``, so that the user's
    ``__main__`` is never re-imported (no ``if __name__ == "__main__"`` guard needed).
    """

    _proc = None

    @classmethod
    def call(cls, *args):
        import pickle
        import subprocess
        import sys
        from pathlib import Path

        for attempt in range(2):
            if cls._proc is None or cls._proc.poll() is not None:
                root = str(Path(__file__).resolve().parents[1])
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
                cls._proc = subprocess.Popen([sys.executable, "-c", "from solvers.budget import _cpsat_serve; _cpsat_serve()"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            try:
                payload = pickle.dumps(args)
                cls._proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
                cls._proc.stdin.flush()
                size = int.from_bytes(_read_exact(cls._proc.stdout, 8), "little")
                ok, value = pickle.loads(_read_exact(cls._proc.stdout, size))
            except (BrokenPipeError, EOFError, OSError):
                cls._proc = None
                if attempt:
                    raise SolverError("the CP-SAT worker process died (out of memory?)") from None
                continue
            if not ok:
                raise value
            return value


def _read_exact(stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("CP-SAT worker closed its pipe")
        buf += chunk
    return buf


def _cpsat_serve() -> None:  # pragma: no cover - runs in the child process
    """Child loop: read (length, pickled args), solve, write (length, pickled (ok, result))."""
    import pickle
    import sys

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            size = int.from_bytes(_read_exact(inp, 8), "little")
        except EOFError:
            return
        args = pickle.loads(_read_exact(inp, size))
        try:
            reply = (True, _cpsat_worker(*args))
        except Exception as exc:  # sent back and re-raised in the parent
            reply = (False, exc)
        data = pickle.dumps(reply)
        out.write(len(data).to_bytes(8, "little") + data)
        out.flush()


def _solve_cpsat(layers, metric, lo, hi, time_limit, min_ratio, target):
    if importlib.util.find_spec("ortools") is None:
        raise SolverNotAvailableError("backend 'cpsat' needs OR-Tools (pip install ortools); it is not installed")
    out = _CpsatProcess.call(layers, metric, lo, hi, time_limit)
    exact = out["exact_costs"]
    if out["status"] == "INFEASIBLE" and exact:
        raise _infeasible(metric, min_ratio, lo / hi * target, target)
    if out["status"] not in ("OPTIMAL", "FEASIBLE"):
        raise SolverError(f"CP-SAT found no width allocation (status {out['status']}"
                          + ("" if exact else "; costs rounded to 1e-6, use backend 'highs'") + ")")
    if not exact:   # a rounded model: its widths are re-checked by the caller, its proof is not ours
        return out["widths"], None, Status.FEASIBLE, out["info"]
    status = Status.OPTIMAL if out["status"] == "OPTIMAL" else Status.TIME_LIMIT
    return out["widths"], out["bound"], status, out["info"]


def _cpsat_worker(layers, metric, lo, hi, time_limit):
    """Build and solve the CP-SAT model (runs in a child process; returns plain data)."""
    try:
        from ortools.sat.python import cp_model
    except ImportError as exc:
        raise SolverNotAvailableError(f"backend 'cpsat' needs OR-Tools; import failed: {exc}") from exc
    coeffs = [L.coefficients(metric) for L in layers]
    s, exact_costs = _integer_scale([v for abc in coeffs for v in abc])
    m = cp_model.CpModel()
    w = []
    for L in layers:
        if L.prunable:
            w.append(m.NewIntVar(1, L.n_channels, f"w_{L.name}"))
        else:
            w.append(L.n_channels)
    terms, const = [], 0
    n_prunable = 0
    obj_terms = []
    for l, L in enumerate(layers):
        a, b, c = (int(round(v * s)) for v in coeffs[l])
        const += c
        wl = w[l]
        terms.append(b * wl)
        if a:
            if L.in_channels is not None or l == 0:
                win = _input_width(layers, l, [M.n_channels for M in layers])
                terms.append(a * win * wl)
            else:
                wp = w[l - 1]
                if isinstance(wp, int) or isinstance(wl, int):
                    terms.append(a * wp * wl)
                else:
                    p = m.NewIntVar(1, layers[l - 1].n_channels * L.n_channels, f"p_{L.name}")
                    m.AddMultiplicationEquality(p, [wp, wl])
                    terms.append(a * p)
        if L.prunable:
            n_prunable += 1
            scaled = [int(round(L.weight * e * ERROR_SCALE)) for e in L.errors]
            e = m.NewIntVar(min(scaled), max(scaled), f"e_{L.name}")
            idx = m.NewIntVar(0, L.n_channels - 1, f"i_{L.name}")
            m.Add(idx == wl - 1)
            m.AddElement(idx, scaled, e)
            obj_terms.append(e)
    total = sum(terms) + const
    # window in scaled integers: lo·s <= total <= hi·s
    m.Add(total <= math.floor(hi * s + 1e-9 * max(1.0, hi * s)))
    m.Add(total >= math.ceil(lo * s - 1e-9 * max(1.0, lo * s)))
    m.Minimize(sum(obj_terms))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 2
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    st = solver.Solve(m)
    name = solver.StatusName(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return {"status": name, "exact_costs": exact_costs}
    widths = [int(solver.Value(x)) if not isinstance(x, int) else x for x in w]
    # valid float bound: integer bound minus the worst-case rounding of each layer's error
    bound = solver.BestObjectiveBound() / ERROR_SCALE - n_prunable * 0.5 / ERROR_SCALE
    return {"status": name, "exact_costs": exact_costs, "widths": widths, "bound": float(bound),
            "info": {"cost_scale": s, "exact_costs": exact_costs, "error_scale": ERROR_SCALE, "branches": int(solver.NumBranches()),
                     "cpsat_time": float(solver.WallTime())}}


__all__ = ["LayerBudget", "BudgetResult", "allocate_budget", "total_cost", "total_error",
           "METRICS", "BACKENDS"]
