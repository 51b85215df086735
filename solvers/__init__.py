"""mipprune's optimization core: channel selection, budgets, network IR, bounds, MILP verification.

Torch-free by contract (a test proves ``import solvers`` leaves torch unloaded). Public names are
imported lazily, so ``import solvers`` is cheap and heavy solvers (cvxpy, pyomo) load on first use.
"""
from __future__ import annotations

import importlib

from solvers.errors import (
    InfeasibleBudgetError,
    InvalidInputError,
    MipPruneError,
    SolverError,
    SolverNotAvailableError,
    UnsupportedLayerError,
)
from solvers.result import SelectionResult, Status

__version__ = "0.1.0"

# public name -> defining module
_LAZY = {
    "SelectionProblem": "solvers.problem",
    "select_channels": "solvers.select",
    "allocate_budget": "solvers.budget",
    "BudgetResult": "solvers.budget",
    "Network": "solvers.network",
    "Dense": "solvers.network",
    "Conv2d": "solvers.network",
    "ReLU": "solvers.network",
    "Flatten": "solvers.network",
    "Normalize": "solvers.network",
    "Add": "solvers.network",
    "load_vnnlib": "solvers.vnnlib",
    "Spec": "solvers.spec",
    "compute_bounds": "solvers.bounds",
    "verify": "solvers.verify",
    "Verdict": "solvers.result",
    "VerificationResult": "solvers.result",
    "pgd_attack": "solvers.attack",
}

__all__ = [
    "MipPruneError", "InvalidInputError", "UnsupportedLayerError", "InfeasibleBudgetError",
    "SolverNotAvailableError", "SolverError", "Status", "SelectionResult", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'solvers' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
