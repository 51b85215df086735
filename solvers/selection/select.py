"""``select_channels``: one entry point, many methods (a registry, in the manner of cvxpy's solvers).

Each method module registers a function ``fn(problem, *, k, budget, backend, time_limit, seed)``
returning a :class:`~solvers.result.SelectionResult`. Validation common to all methods lives here.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

from solvers.errors import InvalidInputError
from solvers.selection.problem import SelectionProblem
from solvers.result import SelectionResult

# name -> "module:function"; imported lazily so that e.g. cvxpy is only loaded when LASSO is used.
METHODS: dict[str, str] = {
    "lasso": "solvers.selection.lasso:select_lasso",
    "magnitude": "solvers.selection.baselines:select_magnitude",
    "random": "solvers.selection.baselines:select_random",
    "exact": "solvers.selection.exact:select_exact",
    "greedy": "solvers.selection.greedy:select_greedy",
    "backward": "solvers.selection.greedy:select_backward",
    "swap": "solvers.selection.swap:select_swap",
}

# Methods that accept a cost budget (Σ cost ≤ budget) instead of, or with, a cardinality k.
BUDGET_METHODS = {"exact", "greedy", "backward", "swap"}
# Methods that prove a lower bound and so can be asked for a relative optimality gap.
GAP_METHODS = {"exact"}


def _resolve(method: str) -> Callable[..., SelectionResult]:
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def select_channels(problem: SelectionProblem, *, k: int | None = None, budget: float | None = None,
                    method: str = "lasso", backend: str | None = None, time_limit: float | None = None,
                    seed: int = 0, gap: float | None = None,
                    options: Mapping[str, Any] | None = None) -> SelectionResult:
    """Choose the channels of ``problem`` to keep.

    Parameters
    ----------
    problem : SelectionProblem
    k : int, optional
        Keep exactly ``k`` channels (``1 <= k <= C``), for methods that take a budget at most ``k``.
    budget : float, optional
        Keep channels whose summed ``problem.costs`` is ``<= budget`` (methods in ``BUDGET_METHODS``).
    method : str
        One of ``METHODS``.
    backend : str, optional
        Solver backend of the method (e.g. ``"highs"``); ``None`` picks the method's default.
    time_limit : float, optional
        Seconds; a method stopped by it reports ``Status.TIME_LIMIT`` with its best incumbent.
    seed : int
        Seed of any randomness (the ``"random"`` method, restarts).
    gap : float, optional
        Methods that certify (``GAP_METHODS``): stop once the proven relative gap
        ``(objective − bound)/objective`` is ``<= gap`` and report ``Status.OPTIMAL`` (default 1e-4).
    options : dict, optional
        The method's own keyword arguments, passed through (e.g. for ``"exact"``:
        ``{"workers": 2, "restart": False, "initial": mask}``; see the method's function). A name the
        method does not take is an ``InvalidInputError`` that lists the ones it does.
    """
    if not isinstance(problem, SelectionProblem):
        raise InvalidInputError(f"problem must be a SelectionProblem; got {type(problem).__name__}")
    fn = _resolve(method)
    if k is None and budget is None:
        raise InvalidInputError("k (channels to keep) or budget (total cost to keep) must be given; got neither")
    if k is not None:
        k = problem.check_k(k)
    if budget is not None:
        if method not in BUDGET_METHODS:
            raise InvalidInputError(
                f"method must be one of {sorted(BUDGET_METHODS)} with a budget; got method {method!r}")
        budget = problem.check_budget(budget)
    if time_limit is not None and not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0 seconds; got {time_limit}")
    gap = check_gap(gap, method)
    extra = {} if gap is None else {"rel_gap": gap}
    extra.update(check_options(options, method))
    return fn(problem, k=k, budget=budget, backend=backend, time_limit=time_limit, seed=seed, **extra)


# Arguments select_channels sets itself: not method options.
_COMMON = {"problem", "k", "budget", "backend", "time_limit", "seed", "rel_gap"}


def method_options(method: str) -> list[str]:
    """The keyword arguments ``method`` takes beyond the common ones (what ``options=`` may hold)."""
    params = inspect.signature(_resolve(method)).parameters.values()
    return [p.name for p in params if p.name not in _COMMON and not p.name.startswith("_")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_options(options: Mapping[str, Any] | None, method: str) -> dict[str, Any]:
    """``options`` as a dict after checking every name against what ``method`` takes (the values are the
    method's to check)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(name, str) for name in options):
        raise InvalidInputError(f"options must be a dict of keyword arguments of method {method!r}; got {options!r}")
    known = method_options(method)
    unknown = [name for name in options if name not in known]
    if unknown:
        taken = ", ".join(known) if known else "none"
        raise InvalidInputError(f"method {method!r} takes no option {unknown[0]!r}; its options are: {taken}"
                                + (" (k, budget, backend, time_limit, seed and gap are arguments of their own)"
                                   if unknown[0] in _COMMON or unknown[0] == "gap" else ""))
    return dict(options)


def check_gap(gap: float | None, method: str) -> float | None:
    """A requested relative optimality gap: ``None``, or a float in (0, 1) for a method in ``GAP_METHODS``."""
    if gap is None:
        return None
    if method not in GAP_METHODS:
        raise InvalidInputError(f"method must be one of {sorted(GAP_METHODS)} to request a gap; got {method!r}")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 < gap < 1:
        raise InvalidInputError(f"gap must be in (0, 1); got {gap!r}")
    return float(gap)
