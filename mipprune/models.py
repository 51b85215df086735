"""Small reference models for the embedded digits data (8×8 grey images, 10 classes)."""
from __future__ import annotations

import re
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


_CONV_ITEM = re.compile(r"^c(\d+)(?:s(\d+))?$")


def parse_conv_item(item) -> tuple[int, int] | None:
    """``"c8"`` → ``(8, 1)``, ``"c16s2"`` → ``(16, 2)`` (channels, stride); anything else → ``None``."""
    m = _CONV_ITEM.match(item) if isinstance(item, str) else None
    if m is None or int(m.group(1)) < 1 or int(m.group(2) or 1) < 1:
        return None
    return int(m.group(1)), int(m.group(2) or 1)


def conv_mlp(arch: Sequence, in_shape: Sequence[int] = (1, 8, 8), n_classes: int = 10) -> nn.Sequential:
    """A verification-friendly CNN (no pooling, no BatchNorm): ``Conv3×3→ReLU`` per conv item, then
    ``Flatten``, then ``Linear→ReLU`` per width, then ``Linear`` to ``n_classes``.

    ``arch``: conv items ``"c<channels>"`` or ``"c<channels>s<stride>"`` (3×3 kernel, padding 1) first,
    then positive ints (hidden widths), e.g. ``["c8", "c16s2", 64]``. Input (N, *in_shape), output
    (N, n_classes) logits.
    """
    arch = list(arch)
    convs = [parse_conv_item(a) for a in arch]
    n_conv = next((i for i, c in enumerate(convs) if c is None), len(arch))
    widths = arch[n_conv:]
    if any(parse_conv_item(a) is not None for a in widths) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise InvalidInputError(f"arch must be conv items like 'c8' or 'c16s2' followed by positive widths; got {arch}")
    c, h, w = (int(v) for v in in_shape)
    layers: list[nn.Module] = []
    for channels, stride in convs[:n_conv]:
        layers += [nn.Conv2d(c, channels, 3, stride=stride, padding=1), nn.ReLU()]
        c, h, w = channels, (h - 1) // stride + 1, (w - 1) // stride + 1
    layers.append(nn.Flatten())
    features = c * h * w
    for width in widths:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, n_classes))
    return nn.Sequential(*layers)


__all__ = ["digits_cnn", "mlp", "conv_mlp", "parse_conv_item"]
