"""Small reference models for the embedded digits data (8×8 grey images, 10 classes)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from solvers.errors import InvalidInputError


def digits_cnn(width: Sequence[int] = (16, 32), hidden: int = 64, n_classes: int = 10) -> nn.Sequential:
    """Conv3×3→BN→ReLU→Conv3×3→BN→ReLU→MaxPool2→Flatten→Linear→ReLU→Linear, for (N, 1, 8, 8) inputs.

    Both convolutions keep the 8×8 size (padding 1); max-pooling halves it, so the first Linear sees
    ``width[1] · 4 · 4`` features. Output: (N, n_classes) logits.
    """
    width = tuple(int(w) for w in width)
    if len(width) != 2 or min(width) < 1:
        raise InvalidInputError(f"width must be two positive channel counts; got {width}")
    if hidden < 1:
        raise InvalidInputError(f"hidden must be >= 1; got {hidden}")
    c1, c2 = width
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def mlp(sizes: Sequence[int] = (64, 100, 100, 10)) -> nn.Sequential:
    """Fully connected ReLU network ``Linear→ReLU→…→Linear`` with layer widths ``sizes``.

    Input (N, sizes[0]); output (N, sizes[-1]) logits (no ReLU after the last layer).
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise InvalidInputError(f"sizes must hold at least two positive widths; got {sizes}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


__all__ = ["digits_cnn", "mlp"]
