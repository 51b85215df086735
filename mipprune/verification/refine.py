"""MILP-refined intermediate bounds (α,β-CROWN's ``bab-refine``), time-boxed, on HiGHS.

For each hidden ReLU block ``i = 1 … L−1`` in turn (block 0 is affine in the input box: its
bounds are already exact), the network up to block ``i`` is encoded once as a big-M MILP
(:func:`solvers.milp.build_milp`, with the already refined bounds of blocks ``< i`` as big-M) and
kept in one ``highspy.Highs``; only its objective changes between neurons. The unstable neurons
of block ``i`` (``l < 0 < u``) are taken most ambiguous first (largest ``|l·u|``), and each is
minimized (new ``l``) and maximized (new ``u``), each solve capped at ``solve_cap`` seconds and
by the block's share of the time left.

Soundness: the new bound is HiGHS's **proven dual bound** of the MILP (never the incumbent), so a
solve cut off by its time limit still gives a valid (if looser) bound; it is moved outward by
``REFINE_SLACK·(1 + |b|)`` for the solver's feasibility tolerances, and intersected with the
bounds it starts from (so it is never looser). The time box holds: HiGHS's presolve (which cannot
be interrupted) is off, and an interrupt callback stops a solve at its cap. Between blocks, block
``i+1``'s CROWN bounds are recomputed over the refined earlier bounds (and intersected too), which
may already stabilize some of its neurons.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mipprune.verification.bounds import Bounds, _crown_layer
from solvers.errors import InvalidInputError
from solvers.milp import build_milp, to_highs
from solvers.network.ir import as_blocks
from solvers.network.spec import Region

__all__ = ["refine_bounds", "RefineInfo", "REFINE_SLACK", "SOLVE_CAP"]

# HiGHS's dual bound is exact only up to its feasibility/optimality tolerances (1e-7 by default)
REFINE_SLACK = 1e-6
MIN_SOLVE = 1.0   # no solve starts with less time left in its block's share (seconds)
SOLVE_CAP = 3.0   # default cap on one neuron's solve (seconds); under ~1 s HiGHS rarely ends its root

# proving a bound needs the branch-and-bound tree, not better incumbents: the root sub-MIP
# heuristics cost seconds per solve (see verify.HIGHS_VERIFY_OPTIONS)
_HIGHS_OPTIONS = {
    "mip_heuristic_effort": 0.0,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_root_reduced_cost": False,
    "mip_heuristic_run_feasibility_jump": False,
    # presolve is not interruptible: it overshot a 2 s time limit by 2 s on MNIST 256x6 (measured),
    # and without it the root bound after 4 s was tighter on 256x4 (−7.22 vs −7.47)
    "presolve": "off",
}


@dataclass
class RefineInfo:
    """What a refinement did: ``solves`` MILP solves (``timed_out`` of them hit their cap),
    ``stabilized`` neurons made stable, ``unstable_before`` / ``unstable_after`` per hidden block,
    ``time`` seconds, ``complete`` False when the time box stopped it before every unstable neuron
    of every block was refined."""

    solves: int = 0
    timed_out: int = 0
    stabilized: int = 0
    unstable_before: list = field(default_factory=list)
    unstable_after: list = field(default_factory=list)
    time: float = 0.0
    complete: bool = True

    def summary(self) -> str:
        return (f"MILP refinement: {self.solves} solves ({self.timed_out} at their cap) in {self.time:.1f} s, "
                f"unstable ReLUs {sum(self.unstable_before)} → {sum(self.unstable_after)}"
                + ("" if self.complete else " (stopped by its time box)"))


def _outward(b: float) -> float:
    return REFINE_SLACK * (1.0 + abs(b))


def refine_bounds(network, bounds: Bounds, region: Region, *, time_limit: float | None = None,
                  solve_cap: float = SOLVE_CAP, layers=None) -> tuple[Bounds, RefineInfo]:
    """MILP-refine the unstable hidden neurons' bounds of ``bounds`` (any sound bounds, e.g. CROWN or
    LP-tightened) over ``region`` (a box; an L1 ball is encoded too).

    Parameters
    ----------
    network : Network or list of AffineBlock
    bounds : Bounds
        ``lower[i]``, ``upper[i]`` (n_i,) per block; not modified.
    time_limit : float, optional
        Seconds for the whole refinement (the time box); ``None``: every unstable neuron is solved
        (each solve still capped at ``solve_cap``).
    solve_cap : float
        Seconds per MILP solve (one direction of one neuron).
    layers : iterable of int, optional
        Blocks to refine (default: every hidden ReLU block but the first).

    Returns
    -------
    (Bounds, RefineInfo)
        Bounds never looser than ``bounds`` (the output block's bounds are passed through) with
        ``method="milp"``, and what was done.
    """
    import highspy

    t0 = time.perf_counter()
    blocks = as_blocks(network)
    L = len(blocks) - 1
    if len(bounds.lower) != L + 1:
        raise InvalidInputError(f"bounds must cover {L + 1} blocks; got {len(bounds.lower)}")
    if time_limit is not None and not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0 seconds or None; got {time_limit!r}")
    if not solve_cap > 0:
        raise InvalidInputError(f"solve_cap must be > 0 seconds; got {solve_cap!r}")
    deadline = None if time_limit is None else t0 + float(time_limit)
    lower = [np.array(a, dtype=np.float64) for a in bounds.lower]
    upper = [np.array(a, dtype=np.float64) for a in bounds.upper]
    relu = [i for i in range(L) if blocks[i].pool is None]
    todo = sorted(set(relu) - {0} if layers is None else set(int(i) for i in layers) & set(relu))
    info = RefineInfo(unstable_before=[int(np.sum((lower[i] < 0) & (upper[i] > 0))) for i in relu])

    for n_done, i in enumerate(todo):
        if deadline is not None and time.perf_counter() >= deadline:
            info.complete = False
            break
        # the earlier blocks may have been refined: CROWN over them first (can only tighten)
        if n_done > 0:
            cl, cu = _crown_layer(blocks, lower, upper, i, region)
            lower[i], upper[i] = np.maximum(lower[i], cl), np.minimum(upper[i], cu)
            lower[i] = np.minimum(lower[i], upper[i])
        l, u = lower[i], upper[i]
        unstable = np.flatnonzero((l < 0) & (u > 0))
        if unstable.size == 0:
            continue
        layer_deadline = None if deadline is None else (
            time.perf_counter() + (deadline - time.perf_counter()) / (len(todo) - n_done))
        order = unstable[np.argsort(-np.abs(l[unstable] * u[unstable]), kind="stable")]
        # the network up to block i, block i as its "output" (its bounds are not used by the encoding)
        model = build_milp(blocks[:i + 1], lower[:i + 1], upper[:i + 1], region)
        if layer_deadline is not None and time.perf_counter() >= layer_deadline - 0.05:
            info.complete = False
            continue
        M, bias = model.out_map
        M = M.tocsr()
        h = to_highs(model, options=_HIGHS_OPTIONS)
        stop_at = [np.inf]   # HiGHS overshoots its time_limit by seconds here (measured): interrupt it too

        def interrupt(e, stop_at=stop_at):   # set the flag both ways: HiGHS keeps it across runs
            e.interrupt(time.perf_counter() > stop_at[0])

        h.cbSimplexInterrupt.subscribe(interrupt)
        h.cbMipInterrupt.subscribe(interrupt)
        n = model.n_vars
        cols = np.arange(n, dtype=np.int32)
        zero = np.zeros(n)
        for k in order:
            for sign in (1.0, -1.0):   # min z_k (lower), then max z_k (upper)
                if l[k] >= 0 or u[k] <= 0:
                    continue   # stable (also after its first solve): the other side changes no relaxation
                left = None if layer_deadline is None else layer_deadline - time.perf_counter()
                if left is not None and left < MIN_SOLVE:   # a shorter solve seldom ends its root
                    info.complete = False
                    break
                cap = solve_cap if left is None else min(solve_cap, left)
                cost = zero.copy()
                row = M.getrow(int(k))
                cost[row.indices] = sign * row.data
                h.changeColsCost(n, cols, cost)
                # a MIP run's time_limit counts from its own start (measured: unlike an LP's, which
                # HiGHS compares with the run time summed over all runs); HiGHS overshoots by ~0.3 s
                h.setOptionValue("time_limit", max(cap - 0.2, 0.05))
                stop_at[0] = time.perf_counter() + cap
                h.run()
                info.solves += 1
                if h.getModelStatus() in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt):
                    info.timed_out += 1
                db = float(h.getInfo().mip_dual_bound)
                if not np.isfinite(db) or abs(db) >= 1e30:
                    continue   # nothing proven (e.g. cut off before the root LP)
                val = sign * (db + sign * float(bias[k]))   # bound on z_k itself: min z or max z
                if sign > 0:
                    l[k] = max(l[k], val - _outward(val))
                else:
                    u[k] = min(u[k], val + _outward(val))
                l[k] = min(l[k], u[k])   # round-off guard: never cross
            else:
                continue
            break
        lower[i], upper[i] = l, u

    info.unstable_after = [int(np.sum((lower[i] < 0) & (upper[i] > 0))) for i in relu]
    info.stabilized = sum(info.unstable_before) - sum(info.unstable_after)
    info.time = time.perf_counter() - t0
    out = Bounds(lower, upper, "milp", bounds.time + info.time, bounds.complete and info.complete,
                 {**bounds.info, "refine_solves": info.solves, "refine_time": info.time})
    return out, info
