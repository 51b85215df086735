"""TECU — task-embedded coordinate update: block-coordinate descent over a network's prune groups.

Blocks are the prune groups (:class:`~mipprune.pruning.graph.PruneGroup`), each with a fixed number of
channels to keep. The state is, per block, a mask and the least-squares weights of its consumer
(bridge layout, dense shape). One *outer iteration* visits the blocks in forward order:

1. **Statistics on the pruned prefix.** The model with every *other* block pruned is captured at
   the block's consumer with ``target=dense`` (inputs from the pruned prefix, outputs from the dense
   network, as in He et al.), giving the block's :class:`~solvers.SelectionProblem`.
2. **Embedded sub-solve.** The block's channels are re-selected by a solver chosen by size:
   ``"exact"`` (certified MIQP, :mod:`solvers.selection.exact`) for ``C <= exact_max_channels`` when it is
   installed, forward greedy up to ``GREEDY_MAX_CHANNELS`` (1024) and He et al.'s LASSO above it,
   each followed by 1-swap local search in later iterations (:mod:`solvers.selection.greedy`).
3. **Later blocks refitted.** Every later block keeps its mask but is refitted by least squares on
   statistics recaptured from the new prefix (errors do not accumulate).
4. **Monotone acceptance.** The candidate network is scored by the end-to-end objective on the
   calibration data and accepted only if the objective does not increase; otherwise it is dropped.

The end-to-end objective is the relative output error ``Σ‖f_pruned(x) − f_dense(x)‖² /
Σ‖f_dense(x)‖²`` (``objective="output"``) or the mean cross-entropy on the calibration labels
(``objective="task"``). Iteration 0 is the sequential He et al. pass (every block solved once in
forward order); the objective recorded after each iteration therefore never increases.

**Inexactness criterion.** Sub-solves start loose and tighten geometrically: at outer iteration
``t`` an exact sub-solve must certify the relative gap ``ε_t = max(ε_min, ε_0 · shrink^t)`` within
``τ_t = min(τ_max, τ_0 · growth^t)`` seconds (defaults ε: 5 %, 0.5 %, 0.05 %, 0.01 %; τ: 0.25 s
doubling); a greedy block runs 1-swap local search from its incumbent with deadline ``τ_t`` and at
most ``2^t`` passes. A block whose sub-solve is certified to ``ε_min`` (or is a 1-swap local
optimum) on its current statistics is not solved again until those statistics change. The descent
stops after ``max_iter`` iterations, or earlier when an iteration changes no block and either every
block is converged or ``τ_t`` has reached ``τ_max``.

Models with merged channel groups (residual adds, concats, gates, grouped convolutions) use the
group version, :mod:`mipprune.pruning.tecu_groups` (same objective, embedded solvers and schedule).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mipprune.pruning.graph import PruneGroup
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError
from solvers.selection.problem import SelectionProblem
from solvers.result import SelectionResult, Status

OBJECTIVES = ("output", "task")

__all__ = ["tecu", "TecuOutcome", "EndToEndObjective", "OBJECTIVES", "embedded_solver", "InexactSchedule"]


# ----------------------------------------------------------------------------------- objective
class EndToEndObjective:
    """The end-to-end objective of a pruned network on fixed calibration data (lower is better).

    ``"output"``: ``Σ‖f(x) − f_dense(x)‖² / Σ‖f_dense(x)‖²`` over all batches (float64).
    ``"task"``: mean cross-entropy of ``f(x)`` against the batches' labels (needs ``(x, y)`` batches).
    The dense outputs are computed once, at construction.
    """

    def __init__(self, dense: nn.Module, data: Iterable, kind: str = "output"):
        from mipprune.torch_utils import split_batch

        if kind not in OBJECTIVES:
            raise InvalidInputError(f"objective must be one of {list(OBJECTIVES)}; got {kind!r}")
        self.kind = kind
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scale = 0.0
        with evaluation_mode(dense):
            for batch in data:
                x, y = split_batch(batch)
                x = prepare_input(dense, x)
                if kind == "task":
                    if y is None:
                        raise InvalidInputError("objective 'task' needs labelled batches (x, y); got inputs only")
                    self.batches.append((x, y.to(x.device)))
                else:
                    ref = dense(x).double()
                    self.scale += float((ref * ref).sum())
                    self.batches.append((x, ref))
        if not self.batches:
            raise InvalidInputError("data must yield at least one batch; got none")
        if kind == "output" and not self.scale > 0:
            raise InvalidInputError("objective 'output' needs a dense output that is not identically zero; got zero")

    def __call__(self, model: nn.Module) -> float:
        total, n = 0.0, 0
        with evaluation_mode(model):
            for x, ref in self.batches:
                out = model(x)
                if self.kind == "task":
                    total += float(F.cross_entropy(out.double(), ref, reduction="sum"))
                    n += len(ref)
                else:
                    total += float(((out.double() - ref) ** 2).sum())
        return total / n if self.kind == "task" else total / self.scale


# ----------------------------------------------------------------------------------- sub-solves
def _has_method(name: str) -> bool:
    from solvers.selection.select import METHODS

    if name not in METHODS:
        return False
    module, fn = METHODS[name].split(":")
    try:
        return hasattr(importlib.import_module(module), fn)
    except ImportError:
        return False


# Forward greedy costs O(k·C) rank-one refits per block; above this many channels the He et al.
# LASSO (a C-variable QP per λ step) is the cheaper start for the local search.
GREEDY_MAX_CHANNELS = 1024


def embedded_solver(n_channels: int, exact_max_channels: int,
                    greedy_max_channels: int = GREEDY_MAX_CHANNELS) -> str:
    """The block solver for a block of ``n_channels``: ``"exact"`` when small enough and installed,
    ``"greedy"`` (forward selection) up to ``greedy_max_channels``, else ``"lasso"``; both
    heuristics are followed by 1-swap local search in later iterations."""
    if n_channels <= exact_max_channels and _has_method("exact"):
        return "exact"
    return "greedy" if n_channels <= greedy_max_channels else "lasso"


def _sub_solve(problem: SelectionProblem, k: int, solver: str, tau: float, eps: float, eps_min: float, t: int,
               current: np.ndarray | None, backend: str | None, seed: int) -> tuple[SelectionResult, bool]:
    """One block sub-solve at accuracy level ``t``: time limit ``tau`` seconds and, for the exact
    solver, relative gap tolerance ``eps``.

    ``current`` is the block's incumbent mask when it was already solved on this very ``problem``
    (then greedy is not recomputed). Returns the result and whether more accuracy cannot change it:
    exact certified a gap <= ``eps_min`` (the final tolerance), or the local search stopped at a
    1-swap local optimum before its deadline.
    """
    from solvers.selection.baselines import result_from_mask
    from solvers.selection.greedy import forward_mask
    from solvers.selection.swap import improve_by_swaps
    from solvers.selection.select import select_channels

    if solver == "exact":
        from solvers.selection.exact import select_exact

        res = select_exact(problem, k=k, backend=backend, time_limit=tau, seed=seed, rel_gap=eps)
        if res.k < k:  # "at most k": fill up greedily (the refit error never increases)
            mask = forward_mask(problem, k, None, start=res.mask)
            res = result_from_mask(problem, mask, method="exact", start=time.perf_counter() - res.solve_time,
                                   backend=res.backend, iterations=res.iterations, bound=res.bound,
                                   status=res.status, info=res.info)
        final = res.status == Status.OPTIMAL and res.gap is not None and res.gap <= eps_min
        if res.status == Status.OPTIMAL and not final:
            # proven only to this iteration's looser tolerance eps: the gap stays, OPTIMAL does not
            res = dataclasses.replace(res, status=Status.FEASIBLE)
        return res, final
    start = time.perf_counter()
    if t == 0:
        return select_channels(problem, k=k, method=solver, seed=seed), False
    mask = current
    if mask is None:
        mask = select_channels(problem, k=k, method=solver, seed=seed).mask
    deadline = start + tau
    improved = improve_by_swaps(problem, mask, deadline=deadline, max_passes=2 ** t)
    converged = np.array_equal(improved, mask) and time.perf_counter() < deadline
    return result_from_mask(problem, improved, method=solver, start=start, info={"local_search": True}), converged


@dataclass(frozen=True)
class InexactSchedule:
    """The sub-solves' inexactness schedule (module docstring): at outer iteration ``t`` the time limit
    ``τ_t = min(τ_max, τ_0 · growth^t)`` seconds and the exact solver's relative gap tolerance
    ``ε_t = max(ε_min, ε_0 · shrink^t)``. Shared by :func:`tecu` and the channel-group TECU."""

    base_time: float
    growth: float
    base_gap: float
    shrink: float
    gap_min: float
    time_limit: float  # τ_max

    @classmethod
    def of(cls, max_iter: int, time_limit: float | None = None, base_time: float = 0.25, growth: float = 2.0,
           base_gap: float = 0.05, shrink: float = 0.1, gap_min: float = 1e-4) -> "InexactSchedule":
        """Check the options (InvalidInputError in the user's terms); ``time_limit`` defaults to
        ``base_time · growth^max_iter``."""
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
            raise InvalidInputError(f"max_iter must be an integer >= 0; got {max_iter!r}")
        if not base_time > 0 or not growth >= 1:
            raise InvalidInputError(f"base_time must be > 0 and growth >= 1; got {base_time} and {growth}")
        if not 0 < gap_min <= base_gap < 1 or not 0 < shrink < 1:
            raise InvalidInputError(f"gaps must satisfy 0 < gap_min <= base_gap < 1 and 0 < shrink < 1; got "
                                    f"{gap_min}, {base_gap} and {shrink}")
        tau_max = time_limit if time_limit is not None else base_time * growth ** max_iter
        return cls(base_time, growth, base_gap, shrink, gap_min, tau_max)

    def tau(self, t: int) -> float:
        return min(self.time_limit, self.base_time * self.growth ** t)

    def eps(self, t: int) -> float:
        return max(self.gap_min, self.base_gap * self.shrink ** t)


def _tighter(new: float | None, old: float | None) -> bool:
    return new is not None and (old is None or new > old)


def _certify(problem: SelectionProblem, mask: np.ndarray, weights: np.ndarray, res: SelectionResult
             ) -> SelectionResult:
    """The incumbent ``mask`` packaged with the lower bound that ``res`` proved on the same problem."""
    from solvers.result import relative_gap

    if np.array_equal(mask, res.mask):
        return res
    objective = problem.error_of(weights)
    gap = relative_gap(objective, res.bound)
    status = Status.OPTIMAL if res.status == Status.OPTIMAL and objective <= res.objective else Status.FEASIBLE
    return dataclasses.replace(res, mask=mask.copy(), weights=weights, objective=objective, gap=gap, status=status)


# ----------------------------------------------------------------------------------- state
@dataclass
class _Block:
    mask: np.ndarray            # (C,) kept channels
    weights: np.ndarray         # (d, m) consumer weights, bridge layout (zero rows for dropped columns)
    problem: SelectionProblem   # the statistics the weights were fitted on (the current prefix)
    result: SelectionResult | None  # the last sub-solve; valid for ``problem`` iff ``solved_here``
    solved_here: bool
    capture_time: float
    n_samples: int
    converged: bool = False     # more sub-solve accuracy cannot change this block on ``problem``


@dataclass
class TecuOutcome:
    """What :func:`tecu` returns.

    Attributes
    ----------
    results : {consumer: SelectionResult}
        Per block, on the final statistics: ``objective`` is the block's relative reconstruction error
        of the final weights, ``bound``/``gap`` are kept only when the block's last sub-solve ran on
        those very statistics (otherwise ``None`` and ``Status.FEASIBLE``); ``method`` is ``"tecu"``
        and ``info["embedded"]`` names the block solver.
    model : nn.Module
        The pruned network of the final state.
    history : list of dict
        Per outer iteration (0 = initial sequential pass): ``iteration``, ``objective`` (after it),
        ``accepted`` (blocks whose update was accepted), ``rejected``, ``unchanged``,
        ``time_limit`` (τ_t, seconds), ``gap_tolerance`` (ε_t), ``time`` (seconds spent).
    rows : {consumer: dict}
        ``error_no_refit``, ``capture_time``, ``n_samples`` of the final statistics (for reports).
    """

    results: dict[str, SelectionResult]
    model: nn.Module
    history: list[dict]
    rows: dict[str, dict] = field(default_factory=dict)


def tecu(dense: nn.Module, data: Iterable, groups: list[PruneGroup], targets: dict[str, int], *,
         example: torch.Tensor, max_iter: int = 3, objective: str = "output", exact_max_channels: int = 64,
         time_limit: float | None = None, base_time: float = 0.25, growth: float = 2.0, base_gap: float = 0.05,
         shrink: float = 0.1, gap_min: float = 1e-4, positions: int = 10,
         max_samples: int | None = None, seed: int = 0, backend: str | None = None,
         on_step: Callable[[str], None] | None = None) -> TecuOutcome:
    """Run TECU (see the module docstring) on ``dense`` and return the pruned network and history.

    Parameters
    ----------
    dense : nn.Module
        The trained network (read only).
    data : re-iterable of batches
        Calibration data (tensors or ``(x, y, ...)``; labels needed for ``objective="task"``).
    groups : list of PruneGroup
        All prune groups of ``dense`` in forward order.
    targets : {consumer: k}
        Channels to keep per pruned block (blocks not named stay whole).
    example : tensor
        One input batch (for surgery checks).
    max_iter : int
        Outer iterations after the initial pass (>= 0).
    objective : "output" or "task"
    exact_max_channels : int
        Blocks with at most this many channels use the exact solver (when installed).
    time_limit : float, optional
        τ_max, the tightest sub-solve time limit in seconds (default ``base_time · growth^max_iter``).
    base_time, growth : float
        τ_0 (seconds) and the geometric growth of the sub-solve time limit.
    base_gap, shrink, gap_min : float
        ε_0, its geometric factor and its floor: the exact sub-solves' relative gap tolerance.
    positions, max_samples, seed : as in :func:`mipprune.pruning.bridge.capture`.
    backend : str, optional
        Backend of the exact solver.
    on_step : callable, optional
        Called with a short description before each capture / solve (progress reporting).
    """
    from mipprune.pruning.bridge import capture
    from mipprune.pruning.surgery import prune_channels

    schedule = InexactSchedule.of(max_iter, time_limit, base_time, growth, base_gap, shrink, gap_min)
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {list(OBJECTIVES)}; got {objective!r}")
    tau_max, eps_of = schedule.time_limit, schedule.eps
    todo = [g for g in groups if g.consumer in targets]
    if not todo:
        raise InvalidInputError("targets must name at least one prune group; got none")
    step = on_step or (lambda _msg: None)
    score = EndToEndObjective(dense, data, objective)
    solvers = {g.consumer: embedded_solver(g.n_channels, exact_max_channels) for g in todo}

    order = {g.consumer: i for i, g in enumerate(todo)}

    def build(state: dict[str, _Block], before: str | None = None) -> nn.Module:
        """The network of ``state``; with ``before``, only the blocks upstream of that one (its
        consumer then has the dense outputs that the capture's target expects)."""
        stop = len(todo) if before is None else order[before]
        plan = {c: (b.mask, b.weights) for c, b in state.items() if order[c] < stop}
        return prune_channels(dense, plan, example) if plan else dense

    def statistics(model: nn.Module, g: PruneGroup) -> tuple[SelectionProblem, float, int]:
        t0 = time.perf_counter()
        st = capture(model, data, [g.consumer], positions=positions, max_samples=max_samples,
                     target=None if model is dense else dense,
                     columns_per_channel={g.consumer: g.columns_per_channel}, seed=seed)[g.consumer]
        return st.problem(), time.perf_counter() - t0, int(st.n_samples)

    def refit_after(state: dict[str, _Block], i: int) -> dict[str, _Block]:
        """Refit every block after position ``i`` (masks kept) on the prefix of ``state``."""
        new = dict(state)
        for g in todo[i + 1:]:
            step(f"refitting {g.consumer}")
            problem, ct, n = statistics(build(new, before=g.consumer), g)
            b = new[g.consumer]
            new[g.consumer] = _Block(b.mask, problem.refit(b.mask), problem, b.result, False, ct, n, False)
        return new

    history: list[dict] = []
    # ---- iteration 0: the sequential pass, every block solved once at the loosest accuracy
    t_iter = time.perf_counter()
    tau = min(tau_max, base_time)
    state: dict[str, _Block] = {}
    for g in todo:
        step(f"iteration 0: {g.consumer} ({solvers[g.consumer]})")
        problem, ct, n = statistics(build(state, before=g.consumer), g)
        res, done = _sub_solve(problem, targets[g.consumer], solvers[g.consumer], tau, eps_of(0), gap_min, 0, None,
                               backend, seed)
        state[g.consumer] = _Block(res.mask.copy(), res.weights, problem, res, True, ct, n, done)
    current_model = build(state)
    value = score(current_model)
    history.append({"iteration": 0, "objective": value, "accepted": [g.consumer for g in todo], "rejected": [],
                    "unchanged": [], "time_limit": tau, "gap_tolerance": eps_of(0),
                    "time": time.perf_counter() - t_iter})

    # ---- outer iterations: block updates accepted only if the end-to-end objective does not increase
    for t in range(1, max_iter + 1):
        t_iter = time.perf_counter()
        tau = min(tau_max, base_time * growth ** t)
        accepted, rejected, unchanged = [], [], []
        for i, g in enumerate(todo):
            c = g.consumer
            b = state[c]
            if b.converged:  # certified (or locally optimal) on its current statistics: nothing to tighten
                unchanged.append(c)
                continue
            step(f"iteration {t}: {c} ({solvers[c]}, τ={tau:.2g}s, ε={eps_of(t):.0e})")
            # the block's statistics equal its stored problem (every upstream change refitted it)
            res, done = _sub_solve(b.problem, targets[c], solvers[c], tau, eps_of(t), gap_min, t,
                                   b.mask if b.solved_here else None, backend, seed)
            incumbent = b.problem.error(b.mask)
            if np.array_equal(res.mask, b.mask) or incumbent <= res.objective:
                # no locally better channels: keep the block, with the new certificate if it is tighter
                if not b.solved_here or _tighter(res.bound, b.result.bound if b.result else None):
                    same = np.array_equal(res.mask, b.mask) or solvers[c] == "exact"  # optimal ⇒ so is b
                    state[c] = dataclasses.replace(b, result=_certify(b.problem, b.mask, b.weights, res),
                                                   solved_here=True, converged=done and same)
                unchanged.append(c)
                continue
            cand = dict(state)
            cand[c] = dataclasses.replace(b, mask=res.mask.copy(), weights=res.weights, result=res,
                                          solved_here=True, converged=done)
            cand = refit_after(cand, i)
            cand_model = build(cand)
            cand_value = score(cand_model)
            if cand_value <= value:
                state, current_model, value = cand, cand_model, cand_value
                accepted.append(c)
            else:
                rejected.append(c)
        history.append({"iteration": t, "objective": value, "accepted": accepted, "rejected": rejected,
                        "unchanged": unchanged, "time_limit": tau, "gap_tolerance": eps_of(t),
                        "time": time.perf_counter() - t_iter})
        if not accepted and (tau >= tau_max or all(state[g.consumer].converged for g in todo)):
            break

    results, rows = {}, {}
    for g in todo:
        b = state[g.consumer]
        err = b.problem.error_of(b.weights)
        info = {"embedded": solvers[g.consumer]}
        if b.solved_here and b.result is not None:
            res = dataclasses.replace(b.result, method="tecu", info={**b.result.info, **info})
        else:  # statistics changed since the last sub-solve: its certificate no longer applies
            res = SelectionResult(mask=b.mask.copy(), weights=b.weights, objective=err, bound=None, gap=None,
                                  status=Status.FEASIBLE, method="tecu", backend=None, solve_time=0.0,
                                  info={**info, "refitted": True})
        results[g.consumer] = res
        rows[g.consumer] = {"error_no_refit": b.problem.error(b.mask, refit=False),
                            "capture_time": b.capture_time, "n_samples": b.n_samples}
    if current_model is dense:  # pragma: no cover - todo is never empty
        current_model = copy.deepcopy(dense)
    return TecuOutcome(results=results, model=current_model, history=history, rows=rows)
