"""Reading and writing user models: a pickled ``nn.Module``, TorchScript, or a ``torch.export``
archive, and ONNX on request.

Pruning needs the Python module (its forward is traced with ``torch.fx`` and its layers are
sliced): a pickled module (``torch.save(model, FILE)``) is pruned directly. TorchScript and
``torch.export`` archives are read and recognised, but carry compiled graphs (TorchScript IR, ATen
ops) without ``nn.Conv2d`` / ``nn.Linear`` modules to cut, so :func:`load_model` says so instead of
pretending. A pruned model is written back in the format it came in (:func:`save_model`).
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["FORMATS", "detect_format", "load_model", "save_model", "export_onnx", "load_tensor"]

FORMATS = ("pickle", "torchscript", "export")


def detect_format(path: Path) -> str:
    """``"torchscript"``, ``"export"`` or ``"pickle"`` from the archive's member names."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"--model must be an existing file; got {str(path)!r}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
            return "export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
    return "pickle"


def load_model(path: Path) -> tuple[nn.Module, str]:
    """``(module, format)``. Pickled modules are loaded with ``weights_only=False``, which runs the
    file's pickled code: only load files you trust.

    Raises :class:`UnsupportedLayerError` for TorchScript / ``torch.export`` archives (they have no
    layers to prune; save the Python module with ``torch.save(model, FILE)``) and
    :class:`InvalidInputError` for anything that is not a module."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice that TorchScript is deprecated
            torch.jit.load(str(path), map_location="cpu")  # a clean error if it is not readable
        raise UnsupportedLayerError(
            f"--model must be a pickled nn.Module (torch.save(model, FILE)) to be pruned; got TorchScript "
            f"({path.name}): its compiled graph has no Conv2d/Linear modules to cut")
    if fmt == "export":
        torch.export.load(str(path))
        raise UnsupportedLayerError(
            f"--model must be a pickled nn.Module (torch.save(model, FILE)) to be pruned; got a torch.export "
            f"archive ({path.name}): its ATen graph has no Conv2d/Linear modules to cut")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidInputError(f"--model must be a module saved with torch.save(model, FILE); got "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"--model must hold a torch.nn.Module saved with torch.save(model, FILE); "
                                f"got {type(model).__name__} (a state_dict needs its model class)")
    return model, fmt


def save_model(model: nn.Module, path: Path, fmt: str, example: torch.Tensor) -> Path:
    """Write ``model`` as ``fmt`` (``pickle``: torch.save; ``torchscript``: traced on ``example``;
    ``export``: torch.export.save)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {list(FORMATS)}; got {fmt!r}")
    model = model.eval()
    if fmt == "pickle":
        torch.save(model, path)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the user asked for TorchScript
            torch.jit.trace(model, (example,)).save(str(path))
    else:
        torch.export.save(torch.export.export(model, (example,)), str(path))
    return path


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """One self-contained ONNX file (TorchScript-based exporter, opset 17, batch dimension dynamic)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices, not the user's concern
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def load_tensor(path: Path, name: str = "--data") -> torch.Tensor:
    """A float tensor from a ``.npy`` file or a ``torch.save``'d tensor."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{name} must be an existing file; got {str(path)!r}")
    try:
        if path.suffix == ".npy":
            t = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInputError(f"{name} must be a .npy array or a tensor saved with torch.save; got "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must hold a tensor; got {type(t).__name__}")
    return t
