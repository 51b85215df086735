"""Import torchvision's PyPI wheel beside the CPU-only torch of this environment (benchmarks only).

The wheel's compiled ops (``torchvision::nms`` …) are built against another torch and do not load,
so ``torchvision/_meta_registrations.py`` fails with ``operator torchvision::nms does not exist``
when it registers fake kernels for them. The models do not use those ops: while torchvision is
imported, ``torch.library.register_fake`` is made to skip operators that do not exist. Nothing in
the ``mipprune`` package uses this; install torchvision with ``pip install --no-deps --target DIR
torchvision`` and put DIR on ``PYTHONPATH`` (or pass ``--torchvision DIR`` to bench_zoo.py).
"""
from __future__ import annotations

import importlib


def import_torchvision():
    import torch
    import torch.library

    original = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        name = op if isinstance(op, str) else getattr(op, "_name", None)
        if isinstance(name, str) and "::" in name:
            ns, _, opname = name.partition("::")
            try:
                getattr(getattr(torch.ops, ns), opname.split(".")[0]).default
            except (AttributeError, RuntimeError):
                return (lambda fn: fn) if not args or not callable(args[0]) else args[0]
        return original(op, *args, **kwargs)

    torch.library.register_fake = tolerant
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = original
