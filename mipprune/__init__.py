"""mipprune, the PyTorch side.

* :mod:`mipprune.pruning` — channel groups, activation statistics, selection, budgets, surgery;
* :mod:`mipprune.verification` — torch → IR export, bounds, attack, the verify pipeline, suites;
* :mod:`mipprune.experiment` — the headline experiment (dense vs pruned verification);
* :mod:`mipprune.train`, :mod:`mipprune.data`, :mod:`mipprune.models`, :mod:`mipprune.torch_utils` —
  training, data and model helpers every part may use; :mod:`mipprune.cli` — the commands.

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
    "capture": "mipprune.pruning.bridge",
    "LayerStatistics": "mipprune.pruning.bridge",
    "ChannelSelector": "mipprune.pruning.selector",
    "load_pruned": "mipprune.pruning.transformer_hf",
    "NotFittedError": "mipprune.pruning.selector",
    "to_network": "mipprune.verification.export",
    "finetune": "mipprune.train",
    "verify": "mipprune.verification.verify",
    "compute_bounds": "mipprune.verification.bounds",
    "pgd_attack": "mipprune.verification.attack",
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
