"""MILP solver discovery: which backends are installed, and a clear error for those that are not.

Backend names: ``"highs"`` (highspy, direct array interface; the default) and ``"pyomo-<solver>"``
for any solver Pyomo's ``SolverFactory`` can run here (e.g. ``"pyomo-appsi_highs"``, ``"pyomo-gurobi"``,
``"pyomo-cbc"``). ``"gurobi"``, ``"cplex"``, ``"scip"`` are accepted as aliases of their Pyomo
interfaces.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

from solvers.errors import SolverNotAvailableError

# Pyomo solver interfaces worth probing (cheap: each probe only looks for a library or executable).
PYOMO_SOLVERS = ("appsi_highs", "highs", "gurobi_direct", "gurobi", "cplex_direct", "cplex", "scip", "cbc", "glpk",
                 "xpress_direct")
ALIASES = {"gurobi": "pyomo-gurobi_direct", "cplex": "pyomo-cplex_direct", "scip": "pyomo-scip",
           "cbc": "pyomo-cbc", "glpk": "pyomo-glpk"}


@functools.lru_cache(maxsize=None)
def _pyomo_available(solver: str) -> bool:
    if importlib.util.find_spec("pyomo") is None:
        return False
    import pyomo.environ as pyo

    # Pyomo logs a warning for every missing solver it probes; discovery should be quiet.
    log = logging.getLogger("pyomo")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        opt = pyo.SolverFactory(solver)
        return bool(opt is not None and opt.available(exception_flag=False))
    except Exception:   # a broken plugin just means "not available"
        return False
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Names of the MILP backends usable on this machine, ``"highs"`` first when installed."""
    out = []
    if importlib.util.find_spec("highspy") is not None:
        out.append("highs")
    out += [f"pyomo-{s}" for s in PYOMO_SOLVERS if _pyomo_available(s)]
    return tuple(out)


def resolve_backend(name: str) -> str:
    """Canonical backend name (aliases mapped), without checking availability."""
    if not isinstance(name, str) or not name:
        raise SolverNotAvailableError(f"backend must be a non-empty string; got {name!r}")
    return ALIASES.get(name, name)


def require_backend(name: str) -> str:
    """The canonical name of ``name`` if installed, else ``SolverNotAvailableError`` listing what is."""
    canon = resolve_backend(name)
    if canon == "highs" and importlib.util.find_spec("highspy") is not None:   # no Pyomo import on this path
        return canon
    if canon.startswith("pyomo-") and _pyomo_available(canon[len("pyomo-"):]):
        return canon
    installed = ", ".join(available_backends()) or "none"
    raise SolverNotAvailableError(f"backend {name!r} is not available; installed: {installed}")


__all__ = ["available_backends", "require_backend", "resolve_backend", "PYOMO_SOLVERS"]
