"""Small torch helpers shared by every part of the torch side (training, pruning, verification,
experiment): batches, devices, dtypes and evaluation mode. Imports nothing else of mipprune."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from solvers.errors import InvalidInputError

__all__ = ["split_batch", "reiterable", "resolve_device", "eval_mode", "evaluation_mode", "model_device",
           "model_float_dtype", "prepare_input"]


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels or None)`` of a batch given as a tensor or a sequence ``(x, y, ...)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise InvalidInputError(
        f"a batch must be a tensor or a sequence (x, y, ...) of tensors; got {type(batch).__name__}")


def reiterable(data: Iterable, name: str = "data") -> Iterable:
    """``data`` itself if it can be iterated many times (a DataLoader, a list), else a list of it.

    Raises ``InvalidInputError`` when ``data`` is not iterable or yields nothing.
    """
    if isinstance(data, torch.Tensor):
        raise InvalidInputError(f"{name} must be an iterable of batches (e.g. a DataLoader or a list "
                                f"of tensors); got a single tensor of shape {tuple(data.shape)}")
    if not isinstance(data, Iterable):
        raise InvalidInputError(f"{name} must be an iterable of batches; got {type(data).__name__}")
    if isinstance(data, Iterator):  # one-shot iterator / generator: keep its batches
        data = list(data)
    try:
        empty = len(data) == 0  # cheap for lists and DataLoaders (no worker start-up)
    except TypeError:
        empty = next(iter(data), None) is None
    if empty:
        raise InvalidInputError(f"{name} must yield at least one batch; got an empty iterable")
    return data


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means the model's device (or CPU).

    Raises ``InvalidInputError`` for CUDA when ``torch.cuda.is_available()`` is false.
    """
    if device is None:
        return model_device(model) if model is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device must be available; got {str(device)!r} but CUDA is not "
                                "available on this machine (torch.cuda.is_available() is False)")
    return dev


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode (BatchNorm uses running statistics, no update), restore after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def evaluation_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put ``models`` in eval mode and ``torch.no_grad`` for the block; restore every module's own
    ``training`` flag afterwards (even on error), so a model that mixed modes gets its mix back."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """Floating dtype of the model's first floating parameter (``None`` if it has none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def prepare_input(model: nn.Module, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``x`` moved to the model's device and, if floating, cast to the model's floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"input must be a torch.Tensor; got {type(x).__name__}")
    dtype = model_float_dtype(model)
    if x.is_floating_point() and dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.to(device if device is not None else model_device(model))
