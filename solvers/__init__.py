"""mipprune's torch-free core: the mathematical programs and the file formats they read.

* :mod:`solvers.selection` — channel selection on activation statistics (LASSO, exact with a proven
  gap, greedy/backward, baselines) behind :func:`select_channels`;
* :mod:`solvers.network` — the numpy network IR, ONNX import, specifications and VNN-LIB;
* :mod:`solvers.budget` — network-wide widths for a FLOPs/params target (HiGHS MILP, CP-SAT);
* :mod:`solvers.milp` — the big-M MILP encoding of a ReLU network (highspy CSR, Pyomo).

Torch-free by contract (a test proves ``import solvers`` leaves torch unloaded and that no module
here imports torch or mipprune). Public names are imported lazily, so ``import solvers`` is cheap
and heavy solvers (cvxpy, pyomo) load on first use. The verifier built on this core is
:func:`mipprune.verify`.
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
    "SelectionProblem": "solvers.selection.problem",
    "select_channels": "solvers.selection.select",
    "allocate_budget": "solvers.budget",
    "BudgetResult": "solvers.budget",
    "LayerBudget": "solvers.budget",
    "Network": "solvers.network.ir",
    "Dense": "solvers.network.layers",
    "Conv2d": "solvers.network.layers",
    "ReLU": "solvers.network.layers",
    "Flatten": "solvers.network.layers",
    "Normalize": "solvers.network.layers",
    "Add": "solvers.network.layers",
    "Branch": "solvers.network.layers",
    "MaxPool2d": "solvers.network.layers",
    "AvgPool2d": "solvers.network.layers",
    "load_vnnlib": "solvers.network.vnnlib",
    "Spec": "solvers.network.spec",
    "Verdict": "solvers.result",
    "VerificationResult": "solvers.result",
    "available_backends": "solvers.backends",
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
