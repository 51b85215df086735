"""Typed, honest solver results (in the manner of linopy): a status enum and frozen result records.

A time limit is reported as ``Status.TIME_LIMIT``, never ``OPTIMAL``; ``bound`` is only ever a
*proven* lower bound (``None`` when the method proves nothing), and ``gap`` is derived from it.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class Status(str, enum.Enum):
    """Termination status of a solve (a ``str`` enum: ``Status.OPTIMAL == "optimal"``)."""

    OPTIMAL = "optimal"          # proven optimal (within the requested gap)
    FEASIBLE = "feasible"        # a valid solution, optimality not proven (heuristics)
    TIME_LIMIT = "time_limit"    # stopped by the time limit; best incumbent returned
    INFEASIBLE = "infeasible"    # proven infeasible
    NO_SOLUTION = "no_solution"  # stopped without any solution
    ERROR = "error"              # the solver failed

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """Relative optimality gap ``(objective - bound) / max(|objective|, 1e-12)``, or ``None``.

    Both are values of a minimization; the gap is clipped at 0 (a bound can exceed the objective by
    round-off only).
    """
    if objective is None or bound is None or not math.isfinite(objective) or not math.isfinite(bound):
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-12)


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`solvers.select_channels`.

    Attributes
    ----------
    mask : bool array (C,)
        ``True`` for the channels kept.
    weights : float64 array (d, m)
        Least-squares weights refitted on the kept columns (rows of dropped columns are zero).
    objective : float
        Relative reconstruction error ``‖Y − Z W‖² / ‖Y‖²`` of ``weights`` (dimensionless, in [0, 1]).
    bound : float or None
        A proven lower bound on the optimal objective of the same problem (``None`` if none proven).
    gap : float or None
        ``(objective − bound) / objective`` as proven (``None`` without a bound).
    status : Status
    method, backend : str
    solve_time : float
        Wall-clock seconds.
    iterations : int
        Method-specific count (λ steps for LASSO, cuts for exact, …).
    info : dict
        Extra method-specific details (e.g. the λ found by LASSO).
    """

    mask: np.ndarray
    weights: np.ndarray
    objective: float
    bound: float | None
    gap: float | None
    status: Status
    method: str
    backend: str | None
    solve_time: float
    iterations: int = 0
    info: dict = field(default_factory=dict, compare=False)

    @property
    def k(self) -> int:
        """Number of channels kept."""
        return int(np.count_nonzero(self.mask))

    @property
    def support(self) -> np.ndarray:
        """Indices of the kept channels, ascending."""
        return np.flatnonzero(self.mask)


class Verdict(str, enum.Enum):
    """Answer of a verification query (VNN-COMP words in comments)."""

    VERIFIED = "verified"    # unsat: no input in the region reaches the unsafe outputs (proven)
    FALSIFIED = "falsified"  # sat: a counterexample, re-checked with the float64 forward
    UNKNOWN = "unknown"      # nothing proven (e.g. incomplete method gave up)
    TIMEOUT = "timeout"      # the time limit was hit before an answer

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`mipprune.verify`.

    Attributes
    ----------
    verdict : Verdict
    counterexample : float64 array (n_inputs,) or None
        Set iff ``verdict is FALSIFIED``; inside the input region, and its float64 forward output
        lies in the unsafe region.
    output : float64 array (n_outputs,) or None
        The network's output at the counterexample.
    time : float
        Wall-clock seconds of the whole query.
    stage : str
        What decided it: ``"attack"``, ``"bounds"``, ``"lp"``, ``"milp"`` (or ``"none"``).
    stage_times : dict
        Seconds spent per stage.
    milp_vars, milp_binaries, milp_nodes : int
        Size of the largest MILP built (0 when none) and branch-and-bound nodes summed over solves.
    message : str
        Human-readable detail (e.g. which disjunct was proven, solver statuses).
    """

    verdict: Verdict
    counterexample: np.ndarray | None = None
    output: np.ndarray | None = None
    time: float = 0.0
    stage: str = "none"
    stage_times: dict = field(default_factory=dict, compare=False)
    milp_vars: int = 0
    milp_binaries: int = 0
    milp_nodes: int = 0
    message: str = ""
