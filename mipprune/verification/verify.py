"""``verify``: decide whether a ReLU network can reach the unsafe outputs of a :class:`Spec`.

Pipeline (each stage only runs while some disjunct is open, all within one time budget):

1. **bounds** — CROWN pre-activation bounds, then a CROWN bound on every disjunct row's margin
   ``(A y − b)_r`` back-substituted directly (much tighter than differencing output bounds). A
   disjunct is safe when one of its rows is ``> 0`` on the whole region; all safe → VERIFIED. The
   inputs minimizing those linear bounds are free candidate counterexamples (checked in float64).
2. **attack** — short PGD (:func:`mipprune.verification.attack.pgd_attack`) on the open disjuncts only, started
   also from those minimizers; a float64-rechecked counterexample ends the query as FALSIFIED.
3''. **alpha** — on the branch-and-bound path (``bounds_method="auto"``): α-CROWN-optimized
   intermediate bounds (:func:`mipprune.verification.crown.optimized_intermediate`, a share of the
   time) instead of the LP stage: on MNIST 256x4 as tight as the per-neuron LPs to 1.5 % in width,
   in a tenth of their time (the LP stage did not finish its 578 LPs in its 30 % of 60 s there).
3. **lp** — the LP relaxation (triangle per unstable ReLU) of each open margin, then LP-tightening
   of the unstable neurons (a bounded share of the budget) and the same again. LP optima are
   candidates and PGD starts too (on MNIST they often are counterexamples outright).
4. **milp** — per open disjunct (most negative margin first) a big-M MILP on HiGHS that minimizes one
   row's margin, with the others as constraints, under the cutoff ``margin <= 0``: HiGHS stops at the
   first point with margin <= 0 (a candidate, re-checked in float64 and polished by PGD if round-off
   spoils it) or proves that none exists (dual bound > 0, or infeasible → the disjunct is safe).

The complete method after the cheap stages is chosen by :func:`choose_complete` (``complete=``):
networks with few inputs (≤ ``INPUT_SPLIT_MAX_INPUTS``, box regions) go to input-splitting branch
and bound right after the attack; networks with more than ``MILP_MAX_HIDDEN`` hidden layers go, after
the α stage (the LP stage with ``bounds_method="lp"``), to ReLU-splitting branch and bound on
α/β-CROWN bounds (:mod:`.bab`, :mod:`.crown`, torch on ``device``) over those root bounds —
optionally MILP-refined first (``refine=``,
:mod:`.refine`: time-boxed HiGHS bounds of the unstable ReLUs, stage ``"refine"``) — and to the MILP
only if branch and bound ends without an answer while time is left; the rest (and L1 regions) go
to the MILP. On fully connected networks with at least ``SPLIT_REFINE_MIN_HIDDEN`` hidden layers,
``refine="auto"`` first gives branch and bound a short try (``SPLIT_PROBE_SHARE``), then tightens
the intermediate bounds by a split search per neuron bound (:mod:`.split_refine`, stage
``"refine"``, at most ``SPLIT_REFINE_SHARE`` of the time left; it stops as soon as the bounds prove
the query, or a short branch and bound on the bounds so far, tried after ``SPLIT_BAB_EVERY`` seconds
and then ever less often, decides it: stage ``"bab"``), and branch and bound continues over them. The
result's ``stage`` is ``"input"``, ``"bab"``, ``"refine"`` or ``"milp"`` accordingly and its message
names the path.

Residual ``Add`` and ``AvgPool2d`` are affine (folded into the blocks, :meth:`Network.to_affine_relu`);
``MaxPool2d`` is relaxed in the bounds and LP and encoded exactly in the MILP; ReLU branch and bound
splits ReLUs only, so a domain left open with every ReLU split goes to the MILP like any other
branch-and-bound "unknown".

Bounds come before the attack because CROWN costs less than a failed attack and settles most
easy instances either way (its minimizers falsify most of the VNN-COMP MNIST "sat" cases).
A time limit hit anywhere before an answer is TIMEOUT (never VERIFIED); a solver failure with no
answer is UNKNOWN (the message says why).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

import numpy as np

from solvers.backends import require_backend
from solvers.deadline import call_with_deadline
from mipprune.verification.bounds import Bounds, _compute, linear_lower_bound, lp_linear_lower_bound
from solvers.network.spec import Region, make_region
from solvers.errors import InvalidInputError
from solvers.milp import MilpModel, MilpSolution, build_milp, solve_highs, solve_pyomo
from solvers.network.ir import Network
from solvers.result import Status, Verdict, VerificationResult
from solvers.network.spec import Spec

BOUNDS_METHODS = ("auto", "interval", "crown", "lp")

# HiGHS settings for verification MILPs: under a cutoff the search only needs to prove the bound
# or hit a point below it; the root sub-MIP heuristics (RINS/RENS, feasibility jump) cost seconds
# per solve here (5.2 s -> 0.8 s on one 256x2 MNIST disjunct), and candidate counterexamples come
# first from the CROWN/LP minimizers and PGD anyway.
HIGHS_VERIFY_OPTIONS = {
    "mip_heuristic_effort": 0.0,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_root_reduced_cost": False,
    "mip_heuristic_run_feasibility_jump": False,
}

MILP_CUTOFF = 1e-6
MILP_GRACE = 0.25   # s past its time limit before a MILP solve's process is stopped (solvers.deadline)

# share of the remaining budget the stages may use before the MILP
ATTACK_SHARE, LP_SHARE = 0.05, 0.3


class _Clock:
    def __init__(self, time_limit: float | None):
        self.t0 = time.perf_counter()
        self.deadline = None if time_limit is None else self.t0 + float(time_limit)
        self.stages: dict[str, float] = {}

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def out(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def share(self, frac: float, cap: float | None = None) -> float | None:
        left = self.left()
        if left is None:
            return cap
        s = max(left, 0.0) * frac
        return s if cap is None else min(s, cap)

    def add(self, stage: str, since: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - since


def _validate(network, spec, time_limit, bounds_method, backend) -> str:
    if not isinstance(network, Network):
        raise InvalidInputError(f"network must be a solvers.Network; got {type(network).__name__}")
    # the layer arrays are plain attributes: NaN/inf assigned after assembly would otherwise reach HiGHS
    # (NaN costs can make it spin) or the big-M encoding
    network.check_finite()
    if not isinstance(spec, Spec):
        raise InvalidInputError(f"spec must be a solvers.Spec; got {type(spec).__name__}")
    if spec.n_inputs != network.n_inputs:
        raise InvalidInputError(f"spec must have {network.n_inputs} inputs to match the network; got {spec.n_inputs}")
    if spec.n_outputs != network.n_outputs:
        raise InvalidInputError(f"spec must have {network.n_outputs} outputs to match the network; "
                                f"got {spec.n_outputs}")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise InvalidInputError(f"time_limit must be > 0 seconds or None; got {time_limit!r}")
    if bounds_method not in BOUNDS_METHODS:
        raise InvalidInputError(f"bounds_method must be one of {list(BOUNDS_METHODS)}; got {bounds_method!r}")
    return require_backend(backend)


def _rows(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """All disjuncts' rows stacked: ``C`` (m, n_outputs) and ``d`` (m,) with margins ``C y + d``."""
    return np.vstack([A for A, _ in spec.disjuncts]), -np.concatenate([b for _, b in spec.disjuncts])


def _row_margins(network, bounds: Bounds, region: Region, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """CROWN lower bounds of every row margin ``(A y − b)_r`` and the inputs minimizing them."""
    C, d = _rows(spec)
    return linear_lower_bound(network, bounds, C, d, region=region, return_points=True)


# A margin lower bound counts as positive only above this (relative to 1 + |bound|): CROWN's float64
# back-substitution rounds, and a bound of +1e-13 on a true minimum of 0 must not verify.
CROWN_SLACK = 1e-9


def _open(lb: np.ndarray, offs: np.ndarray) -> list[int]:
    """Disjuncts not yet proven safe (no row with a margin lower bound > 0, beyond round-off)."""
    safe = lb > CROWN_SLACK * (1.0 + np.abs(lb))
    return [j for j in range(len(offs) - 1) if not np.any(safe[offs[j]:offs[j + 1]])]


def _falsified(network, spec, x, clock, stage, **stats) -> VerificationResult:
    y = network.forward(x)
    return VerificationResult(Verdict.FALSIFIED, counterexample=x, output=y, time=time.perf_counter() - clock.t0,
                              stage=stage, stage_times=dict(clock.stages), **stats)


def _disjunct_model(base: MilpModel, A: np.ndarray, b: np.ndarray, margins: np.ndarray) -> MilpModel:
    """Minimize the row of ``A y − b`` whose bound is best (most likely to prove > 0); other rows as
    constraints ``A_r y <= b_r``."""
    r = int(np.argmax(margins))
    m = base.with_objective(A[r], -b[r])
    others = np.delete(np.arange(A.shape[0]), r)
    if others.size:
        m = m.with_output_constraints(A[others], b[others])
    return m


def _solve(model: MilpModel, backend: str, time_limit: float | None) -> MilpSolution:
    if backend == "highs":
        # cutoff slightly above 0: HiGHS prunes nodes whose bound passes the cutoff up to its own
        # tolerances, so a margin of exactly 0 must not sit on the pruning line
        kw = dict(time_limit=time_limit, cutoff=MILP_CUTOFF, target=0.0, options=HIGHS_VERIFY_OPTIONS)
        if time_limit is None:
            return solve_highs(model, **kw)
        # in a child process, stopped at the deadline: HiGHS checks its clock only between phases
        t = time.perf_counter()
        done, sol = call_with_deadline(solve_highs, (model,), kw, deadline=t + time_limit, grace=MILP_GRACE)
        if done:
            return sol
        return MilpSolution(Status.TIME_LIMIT, None, None, None, 0, time.perf_counter() - t,
                            "stopped at the deadline (HiGHS was past its time limit)")
    return solve_pyomo(model, backend[len("pyomo-"):], time_limit=time_limit)


def verify(network: Network, spec: Spec, *, time_limit: float | None = None, device="cpu", backend: str = "highs",
           bounds_method: str = "auto", attack: bool = True, seed: int = 0,
           complete: str = "auto", refine: str = "auto", bab_options: dict | None = None,
           threads: int = 1, precision: str = "auto", cuts: str = "auto") -> VerificationResult:
    """Prove that no input in ``spec``'s region reaches its unsafe outputs, or find one that does.

    Parameters
    ----------
    network : Network
        ReLU network: Dense, Conv2d, Flatten, Normalize, ReLU, residual Add, AvgPool2d, MaxPool2d.
    spec : Spec
        Input box (optionally ∩ L1 ball) and unsafe region (OR over disjuncts of AND over rows).
    time_limit : float, optional
        Seconds for the whole query; when hit before an answer the verdict is TIMEOUT.
    backend : str
        MILP backend: ``"highs"`` (default, direct arrays) or ``"pyomo-<solver>"``; see
        :func:`solvers.backends.available_backends`.
    bounds_method : {"auto", "interval", "crown", "lp"}
        ``"auto"``: CROWN, then LP tightening (within a share of the budget) when needed; on the
        ReLU branch-and-bound path α-CROWN intermediate bounds instead (``"lp"`` forces the LPs).
    attack : bool
        Try cheap falsification: the minimizers of the CROWN and LP bounds, PGD from them, and PGD
        to polish MILP points. With ``False`` only the MILP can falsify.
    seed : int
        Seed of the attack's random restarts.
    device : str
        Where the torch bound engine of branch and bound runs: ``"cpu"`` (float64) or ``"cuda"`` /
        ``"cuda:N"`` (float32 with a round-off margin, unless ``precision="float64"``). The cheap
        stages always run on the CPU.
    complete : {"auto", "milp", "bab", "input"}
        The complete method after the cheap stages. ``"auto"``: input splitting when the network
        has at most ``INPUT_SPLIT_MAX_INPUTS`` inputs (box regions), one MILP for networks with at
        most ``MILP_MAX_HIDDEN`` hidden ReLU layers (or an L1 region), ReLU-split branch and bound
        on α/β-CROWN bounds over α-CROWN-refined root bounds otherwise (falling back to the MILP
        when branch and bound ends without an answer and time is left). The result's ``stage``
        and ``message`` say which path decided.
    refine : {"auto", "split", "after-lp", "instead-of-lp", "off"}
        Refinement of the unstable ReLUs' intermediate bounds before ReLU branch and bound.
        ``"split"``: a best-first split search per neuron bound
        (:func:`mipprune.verification.split_refine.split_refine_bounds`, at most
        ``SPLIT_REFINE_SHARE`` of the time left, after a short plain branch and bound); MILP
        refinement (:func:`mipprune.verification.refine.refine_bounds`, at most ``REFINE_SHARE``):
        ``"after-lp"`` on top of the LP-tightened bounds, ``"instead-of-lp"`` in place of LP
        tightening (from the CROWN bounds); ``"auto"``: ``"split"`` on fully connected networks
        with at least ``SPLIT_REFINE_MIN_HIDDEN`` hidden layers (``SPLIT_REFINE_AUTO``), the MILP
        one after the LP stage if ``REFINE_AUTO`` (off; see the README for the measurements that
        set both). The message records what ran.
    cuts : {"auto", "scip", "off"}
        Cutting planes in ReLU branch and bound (GCP-CROWN, :mod:`mipprune.verification.cuts`): they join the
        running search (its domains kept) and enter every domain's bound after it through multipliers. First
        SCIP's root cuts of the MILP of the disjunct the search finds worst (:func:`solvers.milp_cuts.root_cuts`,
        ``CUT_ROUNDS`` separation rounds, at most ``CUT_SHARE`` of the time left), then, ``CUT_STAGE_SECONDS``
        later, while that time box allows, those of each disjunct the search still has open (:class:`_ScipCuts`).
        ``"auto"``: on networks the split refinement leaves alone (convolutional, no max pools), once the
        search has run ``CUT_PROBE_SECONDS`` without ending, when pyscipopt is installed (``mipprune[scip]``);
        ``"scip"``: at the search's first step, on any ReLU network without max pools; ``"off"``: never.
    bab_options : dict, optional
        Keyword options of ReLU branch and bound (:func:`mipprune.verification.bab.relu_bab`: e.g.
        ``iters``, ``candidates``, ``intermediate``, ``clauses``, ``conv``); for studies, the defaults are the
        measured best.
    threads : int
        Torch intra-op threads of the searches (branch and bound, split refinement); default 1, right
        when several queries share the machine (a pool over instances). A single query on an otherwise
        idle machine gains from its cores: OVAL21 deep img1052, 60 s, 2 quiet cores: 12,577 domains with
        ``threads=2`` against 7,801 with one. The cheap stages keep one BLAS thread either way.
    precision : {"auto", "float64", "float32"}
        dtype of the torch bound engine: ``"auto"`` is float64 on the CPU and float32 (with the
        round-off margin) on CUDA; ``"float64"`` on CUDA makes a GPU "verified" a float64 proof, like
        the CPU's (GPUs with full-rate fp64, e.g. A100/H100/H200, pay about 2× the memory traffic).

    Returns
    -------
    VerificationResult
        ``verdict`` VERIFIED / FALSIFIED (with a float64-rechecked ``counterexample``) / TIMEOUT /
        UNKNOWN, the deciding ``stage``, ``stage_times`` (seconds) and MILP statistics.
    """
    clock = _Clock(time_limit)
    backend = _validate(network, spec, time_limit, bounds_method, backend)
    if complete not in COMPLETE_METHODS:
        raise InvalidInputError(f"complete must be one of {list(COMPLETE_METHODS)}; got {complete!r}")
    if refine not in REFINE_MODES:
        raise InvalidInputError(f"refine must be one of {list(REFINE_MODES)}; got {refine!r}")
    device = _check_device(device)
    bad = sorted(set(bab_options or {}) - set(BAB_OPTIONS))
    if bad:
        raise InvalidInputError(f"bab_options keys must be among {list(BAB_OPTIONS)}; got {bad}")
    if cuts not in CUTS_MODES:
        raise InvalidInputError(f"cuts must be one of {list(CUTS_MODES)}; got {cuts!r}")
    from mipprune.verification.bab import SEARCH_THREADS
    from mipprune.verification.crown import PRECISION, resolve_precision

    dtype = resolve_precision(precision)
    token = SEARCH_THREADS.set(check_threads(threads))
    token_dtype = PRECISION.set(dtype)
    try:
        with _single_threaded_blas():
            return _verify(network, spec, clock, time_limit, backend, bounds_method, attack, seed, device, complete,
                           refine, bab_options or {}, cuts)
    finally:
        PRECISION.reset(token_dtype)
        SEARCH_THREADS.reset(token)


COMPLETE_METHODS = ("auto", "milp", "bab", "input")
BAB_OPTIONS = ("iters", "root_iters", "batch", "max_domains", "intermediate", "candidates", "screen", "lr_alpha",
               "lr_beta", "joint", "fast32", "max_store_bytes", "clauses", "conv")
CUTS_MODES = ("auto", "scip", "off")
CUT_PROBE_SECONDS = 30.0      # cuts="auto": they join after this much plain search (OVAL21: 19 of the 20 it solves end
                              # within it; the search goes on from its domains: wide img3458 607 s -> 116 s)
CUT_ROUNDS = 8                # SCIP's separation rounds at the root (3 before session 27's faster root LP; with 8:
                              # deep img4405 unsat 407 -> 331 s, wide img9916's frontier at 720 s -0.174 -> -0.131,
                              # the medium ones ~10 % slower)
CUT_SHARE = 0.3               # most of the time left that SCIP's roots may take …
CUT_MAX_SECONDS = 200.0       # … and at most this (deep img4405: 6 of its 9 disjuncts' MILPs in 200 s, unsat in 331 s;
                              # with SCIP's default LP, 1-3 of them in 95-200 s and a time-out)
CUT_CHECK_POINTS = 64         # inputs of the box every cut is checked at (one violated: dropped)
CUT_STAGE_SECONDS = 30.0      # search with the first cuts before the other open disjuncts' MILPs are asked
BAB_SHARE_WITH_MAXPOOL = 0.5     # share of the time left that ReLU branch and bound gets on max-pool nets
BAB_SECONDS_WITH_MAXPOOL = 60.0  # … and its seconds when there is no time limit
INPUT_SPLIT_MAX_INPUTS = 16   # input splitting pays only in low dimension (boxes halve per split)
MILP_MAX_HIDDEN = 2           # α,β-CROWN's configuration for MNIST 256x2 is one MIP, deeper nets BaB
REFINE_MODES = ("auto", "split", "after-lp", "instead-of-lp", "off")
ALPHA_INTERMEDIATE = True     # before ReLU branch and bound: α-CROWN intermediate bounds instead of the LP stage
ALPHA_ITERS = 30              # Adam steps per block (MNIST 256x4: unstable neurons within 1 of the LPs')
ALPHA_SHARE = 0.3             # most of the time left that they may take
REFINE_AUTO = False           # off: measured no gain on MNIST 256x4/256x6 at 60 s on 2 cores (README)
REFINE_MIN_HIDDEN = 4         # "deep": MNIST 256x4 and 256x6 (256x2 goes to the MILP anyway)
REFINE_MIN_UNSTABLE = 50      # fewer open ReLUs: branch and bound splits them faster than HiGHS solves them
REFINE_SHARE = 0.35           # most of the time left that the refinement may take
# split refinement (:mod:`.split_refine`, ``refine="split"``; "auto" on fully connected deep nets): MNIST 256x4 /
# 256x6 prop_0 ε 0.05 verified at the root after it (α-CROWN margins −3.1 / −454 → +0.83 / +0.89)
SPLIT_REFINE_AUTO = True
SPLIT_REFINE_MIN_HIDDEN = 3   # hidden ReLU blocks (block 0 is exact: at least two get refined)
SPLIT_REFINE_MIN_DENSITY = 0.25   # "fully connected": every weight matrix at least this dense (convs are sparse)
SPLIT_REFINE_SHARE = 0.4      # most of the time left that it may take …
SPLIT_REFINE_SECONDS = 120.0  # … and its seconds without a time limit
SPLIT_PROBE_SHARE = 0.05      # before it, plain branch and bound gets this share of the time left (easy ones end)
# during it, a branch and bound of at most SPLIT_BAB_SECONDS tries the bounds so far, at most every
# SPLIT_BAB_EVERY seconds (MNIST 256x4 prop_9 ε 0.05: it closes in 2.3 s on bounds whose CROWN margins are
# still −1.08, 30 s before the refinement would have ended); each failed try doubles the wait before the
# next (SPLIT_BAB_BACKOFF): at a fixed 10 s they took a quarter of the last block's time, and MNIST 256x6
# prop_12 ε 0.05 is proven with a try every 25 s and none, not with one every 10 s (session 13)
SPLIT_BAB_SECONDS = 3.0
SPLIT_BAB_EVERY = 10.0
SPLIT_BAB_BACKOFF = 2.0
# on other nets (``refine="split"`` on convs) a block's search ends once it stalls (< 0.5 % of its width per
# 10 s): OVAL21 deep img1052 spent 40 % of its refinement on a conv block whose width moved 28 → 28
SPLIT_STALL = 0.005


def check_threads(threads) -> int:
    """The searches' torch thread count (``verify(threads=…)``, ``--threads``): an integer >= 1."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInputError(f"threads must be an integer >= 1; got {threads!r}")
    return threads


def _check_device(device) -> str:
    """``"cpu"`` without importing torch; anything else is resolved (and checked) by torch."""
    if isinstance(device, str) and device == "cpu":
        return "cpu"
    from mipprune.verification.crown import resolve_device

    return str(resolve_device(device))


def choose_complete(complete: str, blocks, region: Region) -> str:
    """The complete method ``"auto"`` resolves to (see :func:`verify`)."""
    if complete != "auto":
        return complete
    if region.has_l1:
        return "milp"
    if region.lower.size <= INPUT_SPLIT_MAX_INPUTS:
        return "input"
    return "milp" if len(blocks) - 1 <= MILP_MAX_HIDDEN else "bab"


@contextlib.contextmanager
def _single_threaded_blas():
    """Small dense products dominate here; multi-threaded BLAS only adds sync stalls (measured 10–50×
    slower PGD on a loaded 2-core machine), and parallelism belongs to a pool over instances."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:   # optional: without it BLAS keeps its own setting
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _verify(network: Network, spec: Spec, clock: _Clock, time_limit, backend: str, bounds_method: str,
            attack: bool, seed: int, device: str = "cpu", complete: str = "auto",
            refine: str = "auto", bab_options: dict | None = None, cuts: str = "auto") -> VerificationResult:
    blocks = network.to_affine_relu()   # residual adds become skips, max pools their own blocks
    region = make_region(network.n_inputs, spec.lower, spec.upper, spec.l1_center, spec.l1_radius)
    path = choose_complete(complete, blocks, region)
    if path in ("bab", "input") and region.has_l1:
        raise InvalidInputError(f"complete={path!r} needs a box input region; got an L1 ball (use 'milp')")
    stats = {"milp_vars": 0, "milp_binaries": 0, "milp_nodes": 0}
    notes: list[str] = []

    def result(verdict: Verdict, stage: str, message: str) -> VerificationResult:
        return VerificationResult(verdict, time=time.perf_counter() - clock.t0, stage=stage,
                                  stage_times=dict(clock.stages), message=message, **stats)

    def timeout(where: str) -> VerificationResult:   # with the path that led there (why BaB handed over, …)
        return result(Verdict.TIMEOUT, "none", f"time limit of {time_limit} s hit during {where}"
                      + "".join(f"; {n}" for n in notes))

    from mipprune.verification.attack import pgd_attack, project_region

    def rows_of(js):   # indices into the stacked rows of all disjuncts
        return np.concatenate([np.arange(offs[j], offs[j + 1]) for j in js]) if js else np.zeros(0, int)

    offs = np.concatenate([[0], np.cumsum([A.shape[0] for A, _ in spec.disjuncts])])
    C_all, d_all = _rows(spec)

    def check_points(X: np.ndarray) -> np.ndarray | None:
        """First row of ``X`` (projected onto the region) that is a float64 counterexample."""
        X = X[np.all(np.isfinite(X), axis=1)]
        if X.shape[0] == 0:
            return None
        X = project_region(spec, X)   # solver points may sit a tolerance outside the region
        m = np.array([spec.unsafe_margin(y) for y in network.forward(X)])
        for k in np.argsort(m):
            if m[k] > 0:
                break
            if spec.is_counterexample(network, X[k]):
                return X[k]
        return None

    def run_attack(js, starts, restarts, steps, share, cap):
        sub = Spec(spec.lower, spec.upper, tuple(spec.disjuncts[j] for j in js), spec.l1_center, spec.l1_radius)
        t = time.perf_counter()
        x = pgd_attack(network, sub, restarts=restarts, steps=steps, seed=seed, starts=starts,
                       time_limit=clock.share(share, cap))
        clock.add("attack", t)
        return x if x is not None and spec.is_counterexample(network, x) else None

    # ---- 1. CROWN bounds on every disjunct's margin
    t = time.perf_counter()
    first = "interval" if bounds_method == "interval" else "crown"
    bounds = _compute(blocks, region, first, t, None)
    lb, points = _row_margins(blocks, bounds, region, spec)
    clock.add("bounds", t)
    open_ = _open(lb, offs)
    if not open_:
        return result(Verdict.VERIFIED, "bounds", f"{first} bounds prove every disjunct's margin > 0")
    x = check_points(points[rows_of(open_)]) if attack else None
    if x is not None:
        return _falsified(network, spec, x, clock, "bounds", message="the CROWN minimizer is a counterexample", **stats)

    # ---- 2. short attack on the open disjuncts, started also from the CROWN minimizers
    if attack:
        x = run_attack(open_, points[rows_of(open_)], 3, 30, ATTACK_SHARE, 2.0)
        if x is not None:
            return _falsified(network, spec, x, clock, "attack", message="PGD found a counterexample", **stats)
    if clock.out():
        return timeout("the attack")

    # ---- 3'. few inputs: branch and bound over input boxes (complete; LP would add nothing)
    if path == "input":
        r = _run_bab(network, spec, blocks, bounds, open_, clock, device, seed, "input", result, timeout)
        if r.verdict is not Verdict.UNKNOWN or clock.out():
            return r
        notes.append(f"input splitting ended without an answer ({r.message}); LP and MILP on the rest of the time")

    # ---- 3''. branch and bound ahead: α-CROWN tightens the intermediate bounds instead of the LP stage
    # (MNIST 256x4: as tight as the per-neuron LPs to 1.5 % in width, in a tenth of their time)
    use_lp = bounds_method == "lp" or (bounds_method == "auto" and not (path == "bab" and ALPHA_INTERMEDIATE)) \
        or (bounds_method == "auto" and refine == "instead-of-lp")
    if path == "bab" and bounds_method == "auto" and ALPHA_INTERMEDIATE:
        t = time.perf_counter()
        bounds = _alpha_tighten(blocks, bounds, region, clock, device, notes)
        lb = np.maximum(lb, _row_margins(blocks, bounds, region, spec)[0])
        clock.add("alpha", t)
        open_ = _open(lb, offs)
        if not open_:
            return result(Verdict.VERIFIED, "alpha", "α-CROWN intermediate bounds prove every disjunct's margin > 0")
        if clock.out():
            return timeout("α-CROWN intermediate bounds")

    # ---- 3. LP: relaxation of each open margin, then (auto/lp) LP-tightened neuron bounds
    if use_lp:
        for tighten in (False, True):
            t = time.perf_counter()
            if tighten and refine == "instead-of-lp" and path == "bab":
                bounds = _refine(blocks, bounds, region, clock, notes, "instead of LP tightening")
                t = time.perf_counter()   # the refinement's time is its own stage
                lb = np.maximum(lb, _row_margins(blocks, bounds, region, spec)[0])
            elif tighten:
                lp_time = clock.left() if bounds_method == "lp" else clock.share(LP_SHARE)
                deadline = None if lp_time is None else time.perf_counter() + lp_time
                bounds = _compute(blocks, region, "lp", t, deadline, start=bounds)
                if not bounds.complete:
                    notes.append("LP tightening stopped early by the time budget")
                lb = np.maximum(lb, _row_margins(blocks, bounds, region, spec)[0])
            rows = rows_of(_open(lb, offs))
            X = np.zeros((0, network.n_inputs))
            if rows.size:
                lp_lb, X = lp_linear_lower_bound(blocks, bounds, C_all[rows], d_all[rows], region=region,
                                                  time_limit=clock.share(0.2))
                lb[rows] = np.maximum(lb[rows], lp_lb)
            clock.add("lp", t)
            open_ = _open(lb, offs)
            if not open_:
                return result(Verdict.VERIFIED, "lp", "LP relaxation bounds prove every disjunct's margin > 0")
            x = check_points(X) if attack else None
            if x is None and attack and np.isfinite(X).all(axis=1).any():
                x = run_attack(open_, X[np.isfinite(X).all(axis=1)], 1, 30, ATTACK_SHARE, 2.0)
            if x is not None:
                return _falsified(network, spec, x, clock, "lp", message="an LP-relaxation optimum led to a "
                                  "counterexample", **stats)
            if clock.out():
                return timeout("LP bounds")
    margins = [lb[offs[j]:offs[j + 1]] for j in range(len(spec.disjuncts))]

    # ---- 4''. fully connected deep networks: a short branch and bound, then split-refined intermediate bounds
    if path == "bab" and _wants_split_refine(refine, blocks, bounds):
        r = _run_bab(network, spec, blocks, bounds, open_, clock, device, seed, "bab", result, timeout,
                     SPLIT_PROBE_SHARE, bab_options, why="a first try before refining the intermediate bounds")
        if r.verdict is not Verdict.UNKNOWN or clock.out():
            return r
        notes.append(f"a first branch and bound ended open ({r.message})")
        bounds, probe = _split_refine(blocks, bounds, region, spec, offs, clock, device, notes, network, seed,
                                      bab_options, result)
        if probe is not None:   # a short branch and bound on the partly refined bounds decided it
            return probe if probe.verdict is Verdict.FALSIFIED else result(
                Verdict.VERIFIED, "bab", probe.message + "; " + "; ".join(notes))
        lb = np.maximum(lb, _row_margins(blocks, bounds, region, spec)[0])
        open_ = _open(lb, offs)
        if not open_:
            return result(Verdict.VERIFIED, "refine", "split-refined intermediate bounds prove every disjunct's "
                          "margin > 0; " + "; ".join(notes))
        if clock.out():
            return timeout("split refinement of the intermediate bounds")
        margins = [lb[offs[j]:offs[j + 1]] for j in range(len(spec.disjuncts))]

    # ---- 4'. deeper networks: ReLU-split branch and bound on α/β-CROWN over the LP-refined bounds
    if path == "bab" and _wants_refine(refine, blocks, bounds):
        bounds = _refine(blocks, bounds, region, clock, notes, "after the LP stage")
        lb = np.maximum(lb, _row_margins(blocks, bounds, region, spec)[0])
        open_ = _open(lb, offs)
        if not open_:
            return result(Verdict.VERIFIED, "refine", "MILP-refined bounds prove every disjunct's margin > 0; "
                          + "; ".join(notes))
        if clock.out():
            return timeout("MILP refinement of the bounds")
        margins = [lb[offs[j]:offs[j + 1]] for j in range(len(spec.disjuncts))]
    if path == "bab":
        # ReLU splits cannot make a max pool's relaxation exact: with max pools, branch and bound gets a
        # share of the time and the (exact) MILP the rest
        share = BAB_SHARE_WITH_MAXPOOL if any(b.pool is not None for b in blocks[:-1]) else None
        if _wants_cuts(cuts, blocks, notes):   # they join the search once it has run a while (auto) or at once
            bab_options = {**(bab_options or {}), "cut_source": _ScipCuts(
                blocks, bounds, region, spec, lb, offs, clock, notes, CUT_PROBE_SECONDS if cuts == "auto" else 0.0)}
        r = _run_bab(network, spec, blocks, bounds, open_, clock, device, seed, "bab", result, timeout, share,
                     bab_options)
        if notes:   # record the path (refinement, fallbacks) in the message
            r = dataclasses.replace(r, message=r.message + "; " + "; ".join(notes))
        if r.verdict is not Verdict.UNKNOWN or clock.out():
            return r
        notes.append(f"branch and bound ended without an answer ({r.message}); MILP on the rest of the time")

    # ---- 4. MILP per open disjunct, most negative margin first
    t = time.perf_counter()
    base = build_milp(blocks, bounds.lower, bounds.upper, region)
    clock.add("milp_build", t)
    open_.sort(key=lambda j: float(np.max(margins[j])))
    reason: dict[int, str] = {}   # disjunct -> why it is still open ("time" or a failure message)
    todo = list(open_)
    for fair in (True, False):   # first a fair share of the time per disjunct, then all that is left
        for n_done, j in enumerate(todo):
            A, b = spec.disjuncts[j]
            model = _disjunct_model(base, A, b, margins[j])
            stats["milp_vars"] = max(stats["milp_vars"], model.n_vars)
            stats["milp_binaries"] = max(stats["milp_binaries"], model.n_binaries)
            left = clock.left()
            if left is not None and left <= 0:
                reason[j] = "time"
                continue
            tl = None if left is None else (left / (len(todo) - n_done) if fair else left)
            t = time.perf_counter()
            sol = _solve(model, backend, tl)
            clock.add("milp", t)
            stats["milp_nodes"] += sol.nodes
            if sol.values is not None and sol.objective is not None and sol.objective <= 0:
                x = project_region(spec, model.input_of(sol.values)[None, :])[0]
                if spec.is_counterexample(network, x):
                    return _falsified(network, spec, x, clock, "milp",
                                      message=f"MILP point for disjunct {j} re-checked in float64", **stats)
                if attack:   # round-off spoiled it: polish with PGD from the MILP point
                    t = time.perf_counter()
                    x2 = pgd_attack(network, spec, restarts=1, steps=50, seed=seed, starts=x[None, :],
                                    time_limit=clock.share(0.2, 5.0))
                    clock.add("attack", t)
                    if x2 is not None and spec.is_counterexample(network, x2):
                        return _falsified(network, spec, x2, clock, "milp",
                                          message=f"MILP point for disjunct {j} polished by PGD", **stats)
                reason[j] = f"disjunct {j}: MILP point with margin {sol.objective:.3g} failed the float64 re-check"
            elif sol.status == Status.INFEASIBLE or (sol.status in (Status.OPTIMAL, Status.FEASIBLE)
                                                     and sol.bound is not None and sol.bound > 0):
                reason.pop(j, None)   # disjunct proven safe
            elif sol.status == Status.TIME_LIMIT:
                reason[j] = "time"
            else:
                reason[j] = f"disjunct {j}: solver status {sol.status.value} ({sol.raw_status})"
        todo = [j for j in todo if reason.get(j) == "time"]
        if not todo or clock.deadline is None or clock.out():
            break
    if not reason:
        return result(Verdict.VERIFIED, "milp",
                      f"MILP proved {len(open_)} open disjunct(s) safe" + ("; " + "; ".join(notes) if notes else ""))
    if any(r == "time" for r in reason.values()):
        return timeout(f"the MILP ({len(reason)} disjunct(s) open)")
    return result(Verdict.UNKNOWN, "none", "; ".join(list(reason.values()) + notes))


def _alpha_tighten(blocks, bounds: Bounds, region: Region, clock: _Clock, device, notes: list) -> Bounds:
    """Intermediate bounds tightened by α-CROWN (:func:`crown.optimized_intermediate`, torch, within
    ``ALPHA_SHARE`` of the time left); never looser than ``bounds``."""
    from mipprune.verification import crown
    from mipprune.verification.bab import torch_threads

    with torch_threads():
        net = crown.TorchNet.from_blocks(blocks, device)
        L = net.n_layers
        lo, hi = net.box(region.lower, region.upper)
        share = clock.share(ALPHA_SHARE)
        deadline = None if share is None else time.perf_counter() + share
        lower, upper, done = crown.optimized_intermediate(
            net, lo, hi, [net.tensor(a)[None] for a in bounds.lower[:L - 1]],
            [net.tensor(a)[None] for a in bounds.upper[:L - 1]], iters=ALPHA_ITERS, deadline=deadline)
    new = bounds.copy()
    for i in range(L - 1):
        new.lower[i] = np.maximum(bounds.lower[i], lower[i][0].cpu().numpy().astype(np.float64))
        new.upper[i] = np.minimum(bounds.upper[i], upper[i][0].cpu().numpy().astype(np.float64))
        new.lower[i] = np.minimum(new.lower[i], new.upper[i])
    new.method = "alpha-crown"
    if done < L - 1:
        new.complete = False
        notes.append(f"α-CROWN intermediate bounds stopped by the time budget after {done} of {L - 1} blocks")
    return new


def _wants_split_refine(refine: str, blocks, bounds: Bounds) -> bool:
    """Whether split refinement runs before ReLU branch and bound (``"auto"``: fully connected and deep)."""
    if refine == "split":
        return True
    if refine != "auto" or not SPLIT_REFINE_AUTO or len(blocks) - 1 < SPLIT_REFINE_MIN_HIDDEN:
        return False
    return _fully_connected(blocks) and sum(bounds.n_unstable()) > 0


def _fully_connected(blocks) -> bool:
    """No pools or skips, and every weight matrix at least ``SPLIT_REFINE_MIN_DENSITY`` dense (convs are sparse)."""
    if any(b.pool is not None or b.skips for b in blocks):
        return False
    return all(b.weight.nnz >= SPLIT_REFINE_MIN_DENSITY * b.weight.shape[0] * b.weight.shape[1] for b in blocks)


def _split_refine(blocks, bounds: Bounds, region: Region, spec: Spec, offs, clock: _Clock, device,
                  notes: list, network=None, seed: int = 0, bab_options: dict | None = None, result=None
                  ) -> tuple[Bounds, VerificationResult | None]:
    """Split-refined bounds within ``SPLIT_REFINE_SHARE`` of the time left; stops once they prove every
    disjunct, or once a short branch and bound on them (``SPLIT_BAB_*``, needs ``network`` and ``result``,
    verify's result builder) decides the query, which is then returned as well (verified, or falsified
    with a float64 counterexample)."""
    from mipprune.verification.bab import relu_bab, torch_threads
    from mipprune.verification.split_refine import split_refine_bounds

    t = time.perf_counter()
    new = bounds.copy()
    decided: list = []
    last_try = [-np.inf]
    wait = [SPLIT_BAB_EVERY]

    def proves(lower, upper) -> bool:
        trial = bounds.copy()
        trial.lower, trial.upper = lower, upper
        open_ = _open(_row_margins(blocks, trial, region, spec)[0], offs)
        now = time.perf_counter()
        if not open_ or network is None or result is None or now - last_try[0] < wait[0]:
            return not open_
        if last_try[0] > -np.inf:
            wait[0] *= SPLIT_BAB_BACKOFF
        last_try[0] = now
        deadline = now + SPLIT_BAB_SECONDS if clock.deadline is None else min(now + SPLIT_BAB_SECONDS, clock.deadline)
        r = relu_bab(network, spec, blocks, lower, upper, open_, deadline=deadline, device=device, seed=seed,
                     **(bab_options or {}))
        if _bab_decides(network, spec, r):
            decided.append(r)
            return True
        return False

    share = clock.share(SPLIT_REFINE_SHARE)
    with torch_threads():
        new.lower, new.upper, info = split_refine_bounds(
            blocks, bounds.lower, bounds.upper, region.lower, region.upper,
            time_limit=SPLIT_REFINE_SECONDS if share is None else share, device=device, stop=proves,
            objective=_rows(spec), stall=None if _fully_connected(blocks) else SPLIT_STALL)
    new.method = "split-refined"
    clock.add("refine", t)
    notes.append(info.summary())
    if not decided:
        return new, None
    r = decided[0]
    return new, _bab_decision(network, spec, r, _bab_detail(_RELU_BAB, device, r, " during the refinement"),
                              clock, "bab", result)


def _wants_refine(refine: str, blocks, bounds: Bounds) -> bool:
    """Whether MILP refinement runs after the LP stage (``refine="auto"``: deep and many unstable)."""
    if refine == "after-lp":
        return True
    if refine != "auto" or not REFINE_AUTO or len(blocks) - 1 < REFINE_MIN_HIDDEN:
        return False
    return sum(bounds.n_unstable()) >= REFINE_MIN_UNSTABLE


def _refine(blocks, bounds: Bounds, region: Region, clock: _Clock, notes: list, when: str) -> Bounds:
    """MILP-refined bounds within ``REFINE_SHARE`` of the time left (sound even when cut short)."""
    from mipprune.verification.refine import refine_bounds

    t = time.perf_counter()
    refined, info = refine_bounds(blocks, bounds, region, time_limit=clock.share(REFINE_SHARE))
    clock.add("refine", t)
    notes.append(f"{info.summary()}, {when}")
    return refined


_RELU_BAB = "ReLU-splitting branch and bound (α/β-CROWN)"


def _bab_detail(what: str, device, r, when: str = "") -> str:
    """How a branch and bound ended, in one clause: its own message, domains, batches, root disjuncts."""
    root = f"; {r.info['root_open']} disjunct(s) open after the root α-CROWN" if "root_open" in r.info else ""
    if "root_lb_without_cuts" in r.info:
        root += f" (root bound {r.info['root_lb']:.4g} with the cuts, {r.info['root_lb_without_cuts']:.4g} without)"
    for c in r.info.get("cuts_joined", []):
        root += (f"; {c['cuts']} cuts joined after {c['domains']} domains (root bound with them {c['root_lb']:.4g}, "
                 f"{c['proven']} disjunct(s) proven there)")
    screened = f"; {r.info['screened']} proven by the parent's α/β" if r.info.get("screened") else ""
    cl = r.info.get("clauses")
    clauses = (f"; clauses: {cl['learned']} learned of {cl.get('tried', 0)} tried, {cl['implied']} implied splits, "
               f"{cl['pruned']} domains pruned") if cl else ""
    return f"{what} on {device}{when}: {r.message} ({r.domains} domains, {r.steps} batches{screened}{clauses}{root})"


def _bab_decides(network, spec, r) -> bool:
    """Whether a branch-and-bound result decides the query: verified, or falsified by a counterexample
    that passes the float64 re-check."""
    return r.status == "verified" or (r.status == "falsified" and r.counterexample is not None
                                      and spec.is_counterexample(network, r.counterexample))


def _bab_decision(network, spec, r, detail: str, clock: _Clock, path: str, result) -> VerificationResult | None:
    """The verdict a branch-and-bound result decides (:func:`_bab_decides`); None when it decided nothing."""
    if not _bab_decides(network, spec, r):
        return None
    if r.status == "falsified":
        return _falsified(network, spec, r.counterexample, clock, path, message=detail + "; re-checked in float64",
                          milp_vars=0, milp_binaries=0, milp_nodes=0)
    return result(Verdict.VERIFIED, path, detail)


def _wants_cuts(cuts: str, blocks, notes: list) -> bool:
    """Whether ReLU branch and bound gets SCIP's root cuts (see ``verify(cuts=…)``)."""
    from solvers import milp_cuts

    if cuts == "off" or any(b.pool is not None for b in blocks[:-1]):
        return False
    if cuts == "auto" and _fully_connected(blocks):
        return False
    if not milp_cuts.available():
        if cuts == "scip":
            notes.append("no cutting planes: pyscipopt is not installed (pip install 'mipprune[scip]')")
        return False
    return True


class _ScipCuts:
    """SCIP's root cuts joining ReLU branch and bound (its ``cut_source``), in two stages: once the search has
    run ``first_after`` seconds, the cuts of the MILP minimizing the worst open disjunct's worst row (the
    search's frontier says which; the MILP has no output constraints, so its cuts hold on the whole region);
    ``CUT_STAGE_SECONDS`` of search with them later, those of each disjunct the search still has open, worst
    first, while the time box (``CUT_SHARE`` of the time left when the first call starts, at most
    ``CUT_MAX_SECONDS``) holds half the longest call so far (SCIP stops at the box's end). Each cut is checked at
    ``CUT_CHECK_POINTS`` inputs of the region (a violated one is dropped: numerically unsafe). Searches that end
    within ``first_after`` never pay for SCIP; those that end soon after the first cuts never pay for the rest
    (OVAL21 base img3568: 54 s; 128 s when every open disjunct's cuts came first, before a new search)."""

    def __init__(self, blocks, bounds: Bounds, region: Region, spec: Spec, lb, offs, clock: _Clock, notes: list,
                 first_after: float):
        self.blocks, self.bounds, self.region, self.spec, self.clock, self.notes = blocks, bounds, region, spec, \
            clock, notes
        self.base = None          # the MILP, built at the first call (searches that end before it never pay) …
        self.V = None             # … with its columns at the check points
        self.worst = {j: int(np.argmin(lb[offs[j]:offs[j + 1]])) for j in range(len(offs) - 1)}   # row in disjunct
        self.next_at = time.perf_counter() + first_after
        self.t0 = time.perf_counter()
        self.found: list = []      # the RootCuts of each MILP asked, with the disjunct it minimized
        self.kept = None           # (coef, rhs) of the checked union
        self.budget = None
        self.seconds = 0.0         # wall time of the calls (SCIP and the checks)
        rng = np.random.default_rng(0)
        X = rng.uniform(region.lower, region.upper, size=(CUT_CHECK_POINTS, region.lower.size))
        X[0] = (region.lower + region.upper) / 2
        self.points = X

    def due(self) -> bool:
        return self.next_at is not None and time.perf_counter() >= self.next_at

    def _cuts_of(self, j, limit):
        from solvers.milp_cuts import root_cuts

        A, b = self.spec.disjuncts[j]
        k = self.worst[j]
        return root_cuts(self.base.with_objective(A[k], -b[k]), rounds=CUT_ROUNDS, time_limit=limit)

    def __call__(self, frontier: dict):
        """The union of all cuts so far (a :class:`RootCuts` on ``self.base``), or ``None`` when this stage added
        none; ``frontier``: open disjunct → the search's worst stored bound of it."""
        import scipy.sparse as sp

        from solvers.milp import solution_from_input

        t = time.perf_counter()
        if self.base is None:
            self.base = build_milp(self.blocks, self.bounds.lower, self.bounds.upper, self.region)
            self.V = np.stack([solution_from_input(self.base, self.blocks, x) for x in self.points])
        first = not self.found
        asked = {j for j, _ in self.found}
        order = [j for j in sorted(frontier, key=frontier.get) if j not in asked]
        if first:
            self.budget = self.clock.share(CUT_SHARE, CUT_MAX_SECONDS)
            order = order[:1]
        spent = sum(rc.seconds for _, rc in self.found)
        new = []
        for j in order:
            # the next call while the box holds half the longest so far (SCIP stops at the box's end and hands over
            # the cuts it has; deep img4405's roots take 30-35 s each with 8 rounds)
            if self.found and self.budget - spent < 0.5 * max(rc.seconds for _, rc in self.found):
                break
            new.append(self._cuts_of(j, self.budget - spent))
            self.found.append((j, new[-1]))
            spent += new[-1].seconds
        self.next_at = time.perf_counter() + CUT_STAGE_SECONDS if first else None   # two stages at most
        if new:
            coef = sp.vstack([rc.coef for rc in new]).tocsr()
            rhs = np.concatenate([rc.rhs for rc in new])
            ok = np.all(coef @ self.V.T <= rhs[:, None], axis=1)
            fams = sum((collections.Counter(rc.info["families"]) for rc in new), collections.Counter())
            after = f"after {t - self.t0:.0f} s of branch and bound" if t - self.t0 >= 1 else "before branch and bound"
            what = (f"the worst open disjunct's MILP (its root bound {new[0].bound:.4g}, the search's frontier "
                    f"{frontier[order[0]]:.4g})" if first else f"{len(new)} more open disjunct(s)' MILPs")
            self.notes.append(f"SCIP root cuts {after}: {int(ok.sum())} of {rhs.size} kept from {what} ("
                              + ", ".join(f"{n} {k}" for k, n in fams.most_common())
                              + f"; {CUT_ROUNDS} rounds, {sum(rc.seconds for rc in new):.1f} s)")
            if ok.any():
                coef, rhs = coef[ok], rhs[ok]
                if self.kept is not None:
                    coef, rhs = sp.vstack([self.kept[0], coef]).tocsr(), np.concatenate([self.kept[1], rhs])
                self.kept = (coef, rhs)
                new = [dataclasses.replace(new[0], coef=coef, rhs=rhs, seconds=spent, model=self.base)]
            else:
                new = []
        self.clock.add("cuts", t)
        self.seconds += time.perf_counter() - t
        return new[0] if new else None


def _run_bab(network, spec, blocks, bounds: Bounds, open_, clock: _Clock, device, seed, path, result, timeout,
             share: float | None = None, bab_options: dict | None = None, why: str = "max pools being relaxed"):
    """Branch and bound on the open disjuncts: ``path`` "bab" (ReLU splits) or "input" (input boxes).
    With ``share`` it stops after that share of the time left and says "unknown" (``why``: what goes next)."""
    from mipprune.verification.bab import input_bab, relu_bab, torch_threads

    t = time.perf_counter()
    deadline = clock.deadline
    if share is not None:
        left = clock.left()
        deadline = t + share * (left if left is not None else BAB_SECONDS_WITH_MAXPOOL)
    with torch_threads():
        if path == "input":
            r = input_bab(network, spec, blocks, open_, deadline=deadline, device=device, seed=seed)
            what = "input-splitting branch and bound"
        else:
            r = relu_bab(network, spec, blocks, bounds.lower, bounds.upper, open_, deadline=deadline,
                         device=device, seed=seed, **(bab_options or {}))
            what = _RELU_BAB
    if r.status == "timeout" and share is not None and not clock.out():
        r.status = "unknown"
        r.message = f"stopped after its share ({100 * share:.0f} %) of the time, {why}; " + r.message
    source = (bab_options or {}).get("cut_source")
    clock.add(path, t + (source.seconds if source is not None else 0.0))   # (its SCIP time is the "cuts" stage's)
    detail = _bab_detail(what, device, r)
    decided = _bab_decision(network, spec, r, detail, clock, path, result)
    if decided is not None:
        return decided
    if r.status == "timeout":
        return result(Verdict.TIMEOUT, "none", f"time limit hit during {what}; {detail}")
    return result(Verdict.UNKNOWN, "none", detail)


__all__ = ["verify", "choose_complete", "HIGHS_VERIFY_OPTIONS", "BOUNDS_METHODS", "COMPLETE_METHODS"]
