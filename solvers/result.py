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
