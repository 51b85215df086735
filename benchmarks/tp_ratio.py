"""Torch-Pruning stepped to a FLOPs target: its ``pruning_ratio`` (one uniform channel fraction) is
bisected, since TP has no FLOPs budget of its own. Shared by bench_zoo.py and bench_zoo_quality.py."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def bisect_ratio(flops_at: Callable[[float], tuple[Any, float]], target: float, tries: int = 14
                 ) -> tuple[tuple[float, float, Any] | None, int]:
    """``((ratio, FLOPs ratio, pruned), tries)`` for the smallest channel ratio found whose FLOPs are
    ≤ ``target``·dense, or ``(None, tries)`` when none was. ``flops_at(r)`` prunes a copy at ratio
    ``r`` and returns ``(pruned, FLOPs ratio)``. Bisection on [0, 0.999] from ``1 − √target`` (FLOPs ≈
    (1 − r)² for convolutions between pruned groups); it stops early inside [0.995·target, target]."""
    lo, hi, r, best, n = 0.0, 0.999, 1.0 - target ** 0.5, None, 0
    for n in range(1, tries + 1):
        pruned, ratio = flops_at(r)
        if ratio <= target:
            hi, best = r, (r, ratio, pruned)
            if ratio >= 0.995 * target:
                break
        else:
            lo = r
        r = (lo + hi) / 2
    return best, n
