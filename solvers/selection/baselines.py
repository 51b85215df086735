"""Score-based baselines: keep the top-k channels by a score, then refit by least squares.

These prove nothing about optimality: their results carry ``bound=None`` and ``Status.FEASIBLE``.
"""
from __future__ import annotations

import time

import numpy as np

from solvers.errors import InvalidInputError
from solvers.selection.problem import SelectionProblem
from solvers.result import SelectionResult, Status


def result_from_mask(problem: SelectionProblem, mask: np.ndarray, *, method: str, start: float,
                     backend: str | None = None, iterations: int = 0, bound: float | None = None,
                     status: Status = Status.FEASIBLE, info: dict | None = None) -> SelectionResult:
    """Refit on ``mask`` and package a :class:`SelectionResult` (shared by every method)."""
    from solvers.result import relative_gap

    mask = problem.check_mask(mask)
    weights = problem.refit(mask)
    objective = problem.error_of(weights)
    return SelectionResult(mask=mask, weights=weights, objective=objective, bound=bound,
                           gap=relative_gap(objective, bound), status=status, method=method,
                           backend=backend, solve_time=time.perf_counter() - start,
                           iterations=iterations, info=info or {})


def select_by_scores(problem: SelectionProblem, scores, k: int, *, method: str, start: float,
                     info: dict | None = None) -> SelectionResult:
    """Keep the ``k`` channels with the largest ``scores`` (ties broken by lower index)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != (problem.n_channels,):
        raise InvalidInputError(f"scores must have shape ({problem.n_channels},); got {s.shape}")
    order = np.lexsort((np.arange(s.size), -s))  # descending score, then ascending index
    return result_from_mask(problem, problem.mask_from_support(order[:k]), method=method, start=start,
                            info=info)


def _need_k(k: int | None, method: str) -> None:
    if k is None:
        raise InvalidInputError(f"k (channels to keep) must be given for method {method!r}; got k=None")


def select_magnitude(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                     backend: str | None = None, time_limit: float | None = None,
                     seed: int = 0) -> SelectionResult:
    """Keep the k channels whose current weights have the largest L1 norm (Li et al. 2017), refit."""
    _need_k(k, "magnitude")
    start = time.perf_counter()
    return select_by_scores(problem, problem.channel_norms(1), k, method="magnitude", start=start)


def select_random(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                  backend: str | None = None, time_limit: float | None = None,
                  seed: int = 0) -> SelectionResult:
    """Keep k channels drawn uniformly at random (seeded), refit."""
    _need_k(k, "random")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    support = rng.choice(problem.n_channels, size=k, replace=False)
    return result_from_mask(problem, problem.mask_from_support(support), method="random", start=start,
                            info={"seed": seed})
