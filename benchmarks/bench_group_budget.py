"""Width allocation over channel groups: the HiGHS MILP (proven gap) against the greedy allocation.

For torchvision models (random init, 64×64 inputs) the exact FLOPs polynomial of their channel
groups (:func:`mipprune.pruning.group_budget.group_cost`) is paired with seeded, non-increasing
error curves of the shape the forward-greedy curves have (convex, steeper for small widths), and
both allocations are solved for FLOPs targets 0.5 and 0.25. Printed: groups, binaries, MILP time,
status, proven gap, Σ error of MILP and of greedy (ratio), and whether each lands in the window.

    PYTHONPATH=/tmp/tvpkgs:benchmarks .venv/bin/python benchmarks/bench_group_budget.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
          "regnet_y_400mf", "vgg11_bn"]


def curves_for(cost, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for g, n in cost.units.items():
        k = np.arange(1, n + 1) / n
        scale = rng.uniform(0.2, 2.0)
        out[g] = scale * (1 - k) ** rng.uniform(1.5, 4.0) + 1e-4 * rng.random(n)[::-1].cumsum()[::-1] / n
        out[g][-1] = 0.0
        out[g] = np.maximum.accumulate(out[g][::-1])[::-1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "bench_group_budget.json"))
    args = ap.parse_args()
    from tv_shim import import_torchvision

    from mipprune.pruning.channel_graph import build_channel_graph
    from mipprune.pruning.group_budget import allocate_group_widths, group_cost, solve_group_widths

    tv = import_torchvision()
    torch.set_num_threads(2)
    rows = []
    print(f"{'model':20s} {'groups':>6s} {'binaries':>8s} {'target':>6s} {'MILP s':>7s} {'status':>10s} "
          f"{'gap':>8s} {'Σerr MILP':>10s} {'Σerr greedy':>11s} {'greedy/MILP':>11s} {'in window M/G':>13s}")
    for name in args.models:
        model = getattr(tv.models, name)(num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64)
        graph = build_channel_graph(model, x)
        cost = group_cost(model, graph, x, "flops")
        curves = curves_for(cost, 0)
        for t in (0.5, 0.25):
            if t < cost.floor():
                continue
            t0 = time.perf_counter()
            greedy = allocate_group_widths(cost, curves, t)
            greedy_time = time.perf_counter() - t0
            out = solve_group_widths(cost, curves, t, time_limit=args.time_limit)
            g_err = float(sum(curves[g][greedy[g] - 1] for g in curves))
            g_in = bool(0.995 * t <= cost.ratio(greedy) <= t)
            m_in = bool(0.995 * t <= cost.ratio(out.widths) <= t)
            row = {"model": name, "groups": len(cost.units), "binaries": out.info.get("binaries"), "target": t,
                   "milp_time": out.solve_time, "greedy_time": greedy_time, "status": out.status.value,
                   "gap": out.gap, "milp_error": out.objective, "greedy_error": g_err,
                   "greedy_over_milp": g_err / max(out.objective, 1e-300), "milp_in_window": m_in,
                   "greedy_in_window": g_in, "milp_ratio": out.ratio, "greedy_ratio": cost.ratio(greedy),
                   "source": out.source}
            rows.append(row)
            gap = "-" if out.gap is None else f"{100 * out.gap:.3f}%"
            print(f"{name:20s} {len(cost.units):6d} {row['binaries']:8d} {t:6.2f} {out.solve_time:7.2f} "
                  f"{out.status.value:>10s} {gap:>8s} {out.objective:10.4f} {g_err:11.4f} "
                  f"{row['greedy_over_milp']:11.3f} {'yes' if m_in else 'NO':>6s}/{'yes' if g_in else 'NO':<6s}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
