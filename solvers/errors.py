"""The exception hierarchy of mipprune (shared by the torch-free core and the torch side).

Every message says what was expected and what was got, e.g. ``"k must satisfy 1 <= k <= 8; got 9"``.
"""
from __future__ import annotations


class MipPruneError(Exception):
    """Base class of every error raised on purpose by mipprune."""


class InvalidInputError(MipPruneError, ValueError):
    """An argument has the wrong shape, range, type or content (also a ``ValueError``)."""


class UnsupportedLayerError(MipPruneError):
    """A layer, ONNX node or operator that mipprune cannot handle."""


class InfeasibleBudgetError(MipPruneError):
    """No selection / width allocation can satisfy the requested budget."""


class SolverNotAvailableError(MipPruneError):
    """The requested solver backend is not installed or not known."""


class SolverError(MipPruneError):
    """A solver failed (error status, numerical trouble) where no valid answer can be reported."""


__all__ = [
    "MipPruneError",
    "InvalidInputError",
    "UnsupportedLayerError",
    "InfeasibleBudgetError",
    "SolverNotAvailableError",
    "SolverError",
]
