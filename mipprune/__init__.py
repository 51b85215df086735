"""mipprune, the PyTorch side: activation bridge, dependency graph, surgery, selector, experiments.

Public names load lazily (``import mipprune`` does not import cvxpy or the verifier).
"""
from __future__ import annotations

import importlib

from solvers.errors import (  # re-exported: one error hierarchy for the whole product
    InfeasibleBudgetError,
    InvalidInputError,
    MipPruneError,
    SolverError,
    SolverNotAvailableError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

_LAZY = {
    "capture": "mipprune.bridge",
    "LayerStatistics": "mipprune.bridge",
    "ChannelSelector": "mipprune.selector",
    "NotFittedError": "mipprune.selector",
    "to_network": "mipprune.export",
    "finetune": "mipprune.train",
}

__all__ = ["MipPruneError", "InvalidInputError", "UnsupportedLayerError", "InfeasibleBudgetError",
           "SolverNotAvailableError", "SolverError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mipprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
