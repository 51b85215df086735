"""Embedded default data: scikit-learn's bundled 8×8 digits (no download, ever), as torch tensors.

``load_digits_data`` returns a seeded, stratified train/test split scaled to [0, 1];
``make_loader`` wraps tensors in a seeded :class:`torch.utils.data.DataLoader`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from solvers.errors import InvalidInputError

#: Shape of one digits image as fed to the CNN (channels, height, width) and to an MLP.
DIGITS_IMAGE_SHAPE = (1, 8, 8)
DIGITS_FLAT_SHAPE = (64,)
DIGITS_CLASSES = 10


class DigitsData(NamedTuple):
    """Train/test tensors. ``x_*`` float32, (N, 1, 8, 8) or (N, 64), values in [0, 1];
    ``y_*`` int64 labels (N,) in 0 … 9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0, test_size: float = 0.25, flat: bool = False,
                     device: str | torch.device | None = None) -> DigitsData:
    """Load sklearn's bundled digits (1797 images of 8×8 pixels) as a stratified train/test split.

    Parameters
    ----------
    seed : int
        Seed of the split.
    test_size : float
        Fraction of the samples held out, in (0, 1).
    flat : bool
        ``True`` for inputs of shape (N, 64) (MLPs), ``False`` for (N, 1, 8, 8) (CNNs).
    device : str or torch.device, optional
        Where to put the tensors (default CPU).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise InvalidInputError(f"test_size must be in (0, 1); got {test_size}")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities 0 … 16 → [0, 1]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    shape = DIGITS_FLAT_SHAPE if flat else DIGITS_IMAGE_SHAPE

    def t(a: np.ndarray, is_x: bool) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(a))
        if is_x:
            out = out.reshape(len(a), *shape)
        return out.to(device) if device is not None else out

    return DigitsData(t(x_tr, True), t(y_tr, False), t(x_te, True), t(y_te, False))


def make_loader(x: torch.Tensor, y: torch.Tensor | None = None, *, batch_size: int = 64,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over ``x`` (and labels ``y``), yielding ``(x, y)`` or ``(x,)`` batches.

    Shuffling uses its own ``torch.Generator`` seeded with ``seed``, so the batch order is
    reproducible and independent of the global RNG.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1; got {batch_size}")
    if y is not None and len(y) != len(x):
        raise InvalidInputError(f"x and y must have the same length; got {len(x)} and {len(y)}")
    dataset = TensorDataset(x) if y is None else TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def digits_loaders(seed: int = 0, batch_size: int = 64, flat: bool = False,
                   test_size: float = 0.25) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over the digits split; the train loader shuffles (seeded)."""
    d = load_digits_data(seed=seed, test_size=test_size, flat=flat)
    return (make_loader(d.x_train, d.y_train, batch_size=batch_size, shuffle=True, seed=seed),
            make_loader(d.x_test, d.y_test, batch_size=256))


__all__ = ["DigitsData", "load_digits_data", "make_loader", "digits_loaders", "DIGITS_IMAGE_SHAPE",
           "DIGITS_FLAT_SHAPE", "DIGITS_CLASSES"]
