"""PGD falsification: search the input region for a point whose output is unsafe.

Vectorized numpy projected gradient descent over all restarts and all disjuncts at once (one batch),
with gradients back-propagated by hand through the network's layers (no autograd, no torch).

Loss of a row aimed at disjunct ``(A, b)``: ``max_i (A y − b)_i`` (minimized; ``<= 0`` means the
output is unsafe). Steps: the sign of the gradient (steepest descent for L∞ boxes), or for an L1 ball
a sparse step on the largest gradient entries (the L1 steepest-descent direction, as in SLIDE,
Tramèr & Boneh 2019), each followed by the exact projection onto the input region. Every candidate
is re-checked with :meth:`Spec.is_counterexample` (float64 forward) before it is returned.
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp

from solvers.errors import InvalidInputError
from solvers.network.layers import Add, Branch, Dense, Flatten, MaxPool2d, Normalize, ReLU
from solvers.network.ir import Network
from solvers.network.spec import Spec

__all__ = ["pgd_attack", "project_region"]


# ---------------------------------------------------------------------------------------- network ops
def _ops(network: Network, dtype=np.float32) -> list[tuple]:
    """The network as ops on flattened batches: ("lin", M, b) | ("relu",) | ("add", source) | ….

    ``M`` is a dense array when it is dense enough (BLAS beats CSR there), CSR otherwise. The search
    runs in float32 (faster; every hit is re-checked in float64 before it is returned).
    """
    ops: list[tuple] = []
    for layer, shape in zip(network.layers, network.shapes[:-1]):
        if isinstance(layer, ReLU):
            ops.append(("relu",))
        elif isinstance(layer, Add):
            ops.append(("add", layer.source))
        elif isinstance(layer, MaxPool2d):
            ops.append(("maxpool", layer.windows(shape)))
        elif isinstance(layer, Branch):
            ops.append(("branch", layer.source))
        elif isinstance(layer, Flatten):
            ops.append(("id",))
        elif isinstance(layer, Normalize):
            n = int(np.prod(shape))
            scale = np.broadcast_to(1.0 / layer.std, shape).reshape(-1).astype(np.float64)
            shift = np.broadcast_to(-layer.mean / layer.std, shape).reshape(-1).astype(np.float64)
            ops.append(("scale", scale.astype(dtype), shift.astype(dtype), n))
        elif isinstance(layer, Dense):
            ops.append(("lin", layer.weight.astype(dtype), layer.bias.astype(dtype)))
        else:  # Conv2d (and any other affine layer with as_matrix)
            M, b = layer.as_matrix(shape)
            M = sp.csr_matrix(M)
            if M.nnz > 0.25 * M.shape[0] * M.shape[1] and M.shape[0] * M.shape[1] <= 4_000_000:
                M = M.toarray()
            ops.append(("lin", M.astype(dtype), np.asarray(b, dtype=dtype)))
    return ops


def _forward(ops: list[tuple], X: np.ndarray) -> list[np.ndarray]:
    acts = [X]
    for op in ops:
        h = acts[-1]
        kind = op[0]
        if kind == "relu":
            acts.append(np.maximum(h, 0.0))
        elif kind == "add":
            acts.append(h + acts[op[1]])
        elif kind == "maxpool":
            acts.append(h[:, op[1]].max(axis=-1))
        elif kind == "branch":
            acts.append(acts[op[1]])
        elif kind == "id":
            acts.append(h)
        elif kind == "scale":
            acts.append(h * op[1] + op[2])
        else:
            M, b = op[1], op[2]
            acts.append(np.asarray(M @ h.T).T + b if sp.issparse(M) else h @ M.T + b)
    return acts


def _backward(ops: list[tuple], acts: list[np.ndarray], g_out: np.ndarray) -> np.ndarray:
    """Gradient of ``sum_r g_out[r] · y_r`` with respect to the input rows."""
    grads: list[np.ndarray | None] = [None] * len(acts)
    grads[-1] = g_out
    for i in range(len(ops) - 1, -1, -1):
        g = grads[i + 1]
        if g is None:
            continue
        op = ops[i]
        kind = op[0]
        if kind == "relu":
            gi = g * (acts[i] > 0)
        elif kind == "add":
            src = op[1]
            grads[src] = g if grads[src] is None else grads[src] + g
            gi = g
        elif kind == "id":
            gi = g
        elif kind == "branch":   # the gradient goes to the source; the previous activation gets none
            src = op[1]
            grads[src] = g if grads[src] is None else grads[src] + g
            continue
        elif kind == "maxpool":   # the gradient flows to each window's (first) maximizer
            idx = op[1]
            arg = np.argmax(acts[i][:, idx], axis=-1)                       # (B, n_out)
            src = idx[np.arange(idx.shape[0])[None, :], arg]                 # (B, n_out)
            gi = np.zeros_like(acts[i])
            np.add.at(gi, (np.arange(g.shape[0])[:, None], src), g)
        elif kind == "scale":
            gi = g * op[1]
        else:
            M = op[1]
            gi = np.asarray((M.T @ g.T)).T if sp.issparse(M) else g @ M
        grads[i] = gi if grads[i] is None else grads[i] + gi
    return grads[0]


# ---------------------------------------------------------------------------------------- projection
def project_region(spec: Spec, X: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``X`` (B, n_inputs) onto the input region of ``spec``.

    Box only: a clip. Box ∩ L1 ball: ``x_i = clip(c_i + soft(z_i − c_i, λ), lo_i, hi_i)`` is the
    minimizer of ``‖x − z‖² + 2λ‖x − c‖₁`` over the box (separable, convex per coordinate); λ >= 0 is
    the smallest value with ``‖x(λ) − c‖₁ <= r``, found exactly from the sorted breakpoints when the
    centre lies in the box, else by bisection. Raises ``InvalidInputError`` if the region is empty.
    """
    lo, hi = spec.lower, spec.upper
    Xraw = np.asarray(X, dtype=np.float64)
    X = np.clip(Xraw, lo, hi)
    if spec.l1_center is None:
        return X
    c, r = spec.l1_center, spec.l1_radius
    cc = np.clip(c, lo, hi)
    if np.abs(cc - c).sum() > r:
        raise InvalidInputError(f"the input region is empty: the L1 ball (radius {r}) misses the box; got "
                                f"distance {np.abs(cc - c).sum()} from its centre to the box")
    dist = np.abs(X - c).sum(axis=1)
    out = X.copy()
    rows = np.flatnonzero(dist > r)
    if rows.size == 0:
        return out
    Z = Xraw[rows] - c     # the soft threshold acts on the unclipped point
    if np.all(cc == c):
        lam = _l1_lambda_exact(np.abs(Z), np.where(Z > 0, hi - c, c - lo), r)
    else:
        lam = _l1_lambda_bisect(Xraw[rows], c, lo, hi, r)
    out[rows] = np.clip(c + np.sign(Z) * np.maximum(np.abs(Z) - lam[:, None], 0.0), lo, hi)
    # round-off may leave the sum a hair above r: shrink toward the centre (stays inside the box when
    # the centre does; otherwise one more bisection-safe step)
    over = np.abs(out[rows] - c).sum(axis=1)
    bad = over > r
    if np.any(bad):
        fac = (r / over[bad]) * (1.0 - 1e-12)
        out[rows[bad]] = np.clip(cc + (out[rows[bad]] - cc) * fac[:, None], lo, hi)
    return out


def _l1_lambda_exact(a: np.ndarray, u: np.ndarray, r: float) -> np.ndarray:
    """Per row: the λ >= 0 with ``Σ_i min(max(a_i − λ, 0), u_i) = r`` (a, u: (B, n), u >= 0).

    The sum is piecewise linear and non-increasing in λ: coordinate i shrinks (slope −1) on
    ``[max(a_i − u_i, 0), a_i]``. Events sorted by λ give the function at every breakpoint.
    """
    B, n = a.shape
    start = np.maximum(a - u, 0.0)
    lam = np.concatenate([start, a], axis=1)
    dslope = np.concatenate([-np.ones((B, n)), np.ones((B, n))], axis=1)
    dslope[:, :n][a <= start] = 0.0   # zero-length intervals contribute nothing
    dslope[:, n:][a <= start] = 0.0
    order = np.argsort(lam, axis=1, kind="stable")
    lam_s = np.take_along_axis(lam, order, axis=1)
    ds = np.take_along_axis(dslope, order, axis=1)
    g0 = np.minimum(a, u).sum(axis=1)                 # value at λ = 0
    slope_after = np.cumsum(ds, axis=1)               # slope on (lam_s[k], lam_s[k+1])
    seg = np.diff(lam_s, axis=1) * slope_after[:, :-1]
    g = g0[:, None] + np.concatenate([np.zeros((B, 1)), np.cumsum(seg, axis=1)], axis=1)  # g at lam_s
    # first breakpoint where g <= r; interpolate on the segment before it
    k = np.argmax(g <= r, axis=1)
    k = np.maximum(k, 1)
    idx = np.arange(B)
    g_prev, l_prev = g[idx, k - 1], lam_s[idx, k - 1]
    s = slope_after[idx, k - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(s < 0, l_prev + (r - g_prev) / s, lam_s[idx, k])
    return np.maximum(out, 0.0)


def _l1_lambda_bisect(X, c, lo, hi, r, iters: int = 60) -> np.ndarray:
    Z = X - c
    a_lo = np.zeros(X.shape[0])
    a_hi = np.abs(Z).max(axis=1) + 1.0
    for _ in range(iters):
        mid = 0.5 * (a_lo + a_hi)
        x = np.clip(c + np.sign(Z) * np.maximum(np.abs(Z) - mid[:, None], 0.0), lo, hi)
        feas = np.abs(x - c).sum(axis=1) <= r
        a_hi = np.where(feas, mid, a_hi)
        a_lo = np.where(feas, a_lo, mid)
    return a_hi


# ---------------------------------------------------------------------------------------- attack
def _loss_and_grad_y(ys: np.ndarray, A_rows: np.ndarray, b_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row r: ``max_i (A_r y_r − b_r)_i`` and its (sub)gradient in ``y_r``.

    ``A_rows`` (B, k, m) with rows padded by copies of the first atom; ``b_rows`` (B, k).
    """
    vals = np.einsum("bkm,bm->bk", A_rows, ys) - b_rows
    arg = np.argmax(vals, axis=1)
    idx = np.arange(ys.shape[0])
    return vals[idx, arg], A_rows[idx, arg, :]


def pgd_attack(network: Network, spec: Spec, *, restarts: int = 10, steps: int = 100,
               step_size: float | None = None, seed: int = 0, time_limit: float | None = None,
               starts: np.ndarray | None = None) -> np.ndarray | None:
    """Look for a counterexample to ``spec`` on ``network`` by projected gradient descent.

    Parameters
    ----------
    network : Network
    spec : Spec
        Input region (box, optionally ∩ L1 ball) and unsafe output region (disjunction).
    restarts : int
        Starting points per disjunct (the first is the region's centre, the rest uniform random).
    steps : int
        Gradient steps per start (all starts run together as one batch).
    step_size : float, optional
        Initial step, as a fraction of each coordinate's box width for L∞ (default 0.25), or of the
        L1 radius for L1 balls (default 0.25); it decays on a cosine schedule.
    seed : int
        Seed of the random starts.
    time_limit : float, optional
        Seconds; the attack stops (returning ``None``) once exceeded.
    starts : array (k, n_inputs), optional
        Extra candidate points (e.g. MILP or surrogate solutions): projected onto the region, checked
        directly, then used as starts for every disjunct.

    Returns
    -------
    float64 array (n_inputs,) or None
        A point that passed ``spec.is_counterexample(network, x)`` (float64), else ``None``.
    """
    t0 = time.perf_counter()
    if spec.n_inputs != network.n_inputs:
        raise InvalidInputError(f"spec must have {network.n_inputs} inputs to match the network; "
                                f"got {spec.n_inputs}")
    if spec.n_outputs != network.n_outputs:
        raise InvalidInputError(f"spec must have {network.n_outputs} outputs to match the network; "
                                f"got {spec.n_outputs}")
    if restarts < 1:
        raise InvalidInputError(f"restarts must be >= 1; got {restarts}")
    if steps < 0:
        raise InvalidInputError(f"steps must be >= 0; got {steps}")
    if step_size is not None and not step_size > 0:
        raise InvalidInputError(f"step_size must be > 0; got {step_size}")
    deadline = math.inf if time_limit is None else t0 + float(time_limit)

    n = spec.n_inputs
    rng = np.random.default_rng(seed)
    ops = _ops(network)
    lo, hi = spec.lower, spec.upper
    width = hi - lo
    is_l1 = spec.l1_center is not None

    def check(X: np.ndarray, losses: np.ndarray, tol: float) -> np.ndarray | None:
        # try the most violating candidates first (a few per step); each must pass the float64 re-check
        for r in np.argsort(losses)[:8]:
            if losses[r] > tol:
                break
            # float32 rounding may put X[r] a hair outside the float64 region: project it back
            x = project_region(spec, np.asarray(X[r:r + 1], dtype=np.float64))[0]
            if spec.is_counterexample(network, x):
                return x
        return None

    # --- explicit candidates first (cheap: one forward)
    extra = None
    if starts is not None:
        extra = np.asarray(starts, dtype=np.float64)
        extra = extra.reshape(1, -1) if extra.ndim == 1 else extra.reshape(extra.shape[0], -1)
        if extra.shape[1] != n:
            raise InvalidInputError(f"starts must have {n} columns (n_inputs); got {extra.shape[1]}")
        extra = project_region(spec, extra)
        margins = np.array([spec.unsafe_margin(y) for y in network.forward(extra)])
        hit = check(extra, margins, 0.0)
        if hit is not None:
            return hit

    # --- batch: every start aimed at every disjunct
    nd = len(spec.disjuncts)
    kmax = max(A.shape[0] for A, _ in spec.disjuncts)
    m = spec.n_outputs
    A_pad = np.empty((nd, kmax, m))
    b_pad = np.empty((nd, kmax))
    for j, (A, b) in enumerate(spec.disjuncts):
        A_pad[j, : A.shape[0]], b_pad[j, : A.shape[0]] = A, b
        A_pad[j, A.shape[0]:], b_pad[j, A.shape[0]:] = A[0], b[0]   # padding repeats atom 0 (max unchanged)

    center = project_region(spec, (spec.l1_center if is_l1 else 0.5 * (lo + hi))[None, :])[0]
    base = [center[None, :]]
    if restarts > 1:
        base.append(project_region(spec, lo + rng.random((restarts - 1, n)) * width))
    if extra is not None:
        base.append(extra)
    S = np.concatenate(base, axis=0)                               # (s, n)
    X = np.repeat(S, nd, axis=0).astype(np.float32)                 # row = (start, disjunct)
    target = np.tile(np.arange(nd), S.shape[0])
    A_rows, b_rows = A_pad[target].astype(np.float32), b_pad[target].astype(np.float32)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    step_box = (0.25 if step_size is None else float(step_size)) * width.astype(np.float32)

    frac = 0.25 if step_size is None else float(step_size)
    for t in range(steps + 1):
        acts = _forward(ops, X)
        loss, gy = _loss_and_grad_y(acts[-1], A_rows, b_rows)
        # float32 round-off: candidates slightly above 0 may still be hits in float64
        hit = check(X, loss, 1e-5 * (1.0 + float(np.abs(acts[-1]).max())))
        if hit is not None:
            return hit
        if t == steps or time.perf_counter() > deadline:
            break
        g = _backward(ops, acts, gy)
        decay = 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1))) + 0.02
        if is_l1:
            # sparse L1 steepest descent: move the top ~1 % of coordinates by the gradient's sign
            q = max(1, n // 100)
            absg = np.abs(g)
            thresh = -np.partition(-absg, q - 1, axis=1)[:, q - 1:q]
            D = np.where((absg >= thresh) & (absg > 0), np.sign(g), 0.0)
            cnt = np.maximum((D != 0).sum(axis=1, keepdims=True), 1)
            X = project_region(spec, X - frac * decay * spec.l1_radius * D / cnt).astype(np.float32)
        else:
            X = np.clip(X - np.float32(decay) * step_box * np.sign(g), lo32, hi32)
    return None
