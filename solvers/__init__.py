"""mipprune's optimization core: channel selection, budgets, network IR, bounds, MILP verification.

Torch-free by contract (a test proves ``import solvers`` leaves torch unloaded). Public names are
imported lazily, so ``import solvers`` is cheap and heavy solvers (cvxpy, pyomo) load on first use.
"""
from __future__ import annotations

import importlib
import sys
import types

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
    "LayerBudget": "solvers.budget",
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
    "available_backends": "solvers.backends",
}

__all__ = [
    "MipPruneError", "InvalidInputError", "UnsupportedLayerError", "InfeasibleBudgetError",
    "SolverNotAvailableError", "SolverError", "Status", "SelectionResult", *_LAZY,
]


class _SolversPackage(types.ModuleType):
    """``solvers.verify`` is both a submodule (``solvers/verify.py``, per DESIGN.md) and the public
    function. Importing the submodule makes Python bind the module object on the package, which
    would shadow the function; keep the function there instead (``from solvers.verify import ...``
    and ``importlib.import_module("solvers.verify")`` still give the module)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTION_NAMED_LIKE_MODULE and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_FUNCTION_NAMED_LIKE_MODULE = {"verify"}
sys.modules[__name__].__class__ = _SolversPackage


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'solvers' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
