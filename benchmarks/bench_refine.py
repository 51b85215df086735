"""MILP-refined intermediate bounds before ReLU branch and bound (issue 13 item 3): the same
instances with ``verify(refine=...)`` set to each mode, on the VNN-COMP 2022 MNIST-FC folder.

    python benchmarks/bench_refine.py --modes off after-lp [--max-timeout 60] [--instances net/prop ...]

Prints one table per mode (verdict, seconds, message) and a summary (solved / wrong / median),
writes JSON to benchmarks/out/refine_<modes>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mipprune.verification.suite import run_suite

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_mnist_fc"
# timed out at 60 s in benchmarks/out/vnncomp_256x{4,6}_60s.json (all "unsat" by consensus)
DEFAULT_INSTANCES = [
    "mnist-net_256x4.onnx/prop_6_0.03.vnnlib", "mnist-net_256x4.onnx/prop_0_0.05.vnnlib",
    "mnist-net_256x4.onnx/prop_2_0.05.vnnlib", "mnist-net_256x4.onnx/prop_4_0.05.vnnlib",
    "mnist-net_256x6.onnx/prop_1_0.03.vnnlib", "mnist-net_256x6.onnx/prop_9_0.03.vnnlib",
    "mnist-net_256x6.onnx/prop_0_0.05.vnnlib", "mnist-net_256x6.onnx/prop_2_0.05.vnnlib",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--modes", nargs="+", default=["off", "after-lp"],
                    choices=["auto", "after-lp", "instead-of-lp", "off"])
    ap.add_argument("--instances", nargs="+", default=DEFAULT_INSTANCES)
    ap.add_argument("--max-timeout", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "load_at_start": load, "modes": {}}
    summary = Table(title="MILP refinement before branch and bound")
    for c in ("refine", "instances", "solved", "wrong", "timeout", "median s (solved)", "wall s"):
        summary.add_column(c)
    for mode in args.modes:
        rows, t0 = [], time.perf_counter()
        for inst in args.instances:
            rows += run_suite(args.bench_dir, filter=inst, max_timeout=args.max_timeout,
                              options={"refine": mode})
        wall = time.perf_counter() - t0
        table = Table(title=f"refine={mode}")
        for c in ("instance", "consensus", "verdict", "s", "message"):
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(f"{r.network.replace('mnist-net_', '').replace('.onnx', '')}/{r.property}", r.consensus,
                          r.verdict, f"{r.time_s:.1f}", r.message[-160:])
        console.print(table)
        solved = [r for r in rows if r.solved]
        times = sorted(r.time_s for r in solved)
        med = times[len(times) // 2] if times else None
        wrong = sum(r.wrong for r in rows)
        summary.add_row(mode, str(len(rows)), str(len(solved)), str(wrong),
                        str(sum(r.verdict == "timeout" for r in rows)), "-" if med is None else f"{med:.1f}",
                        f"{wall:.0f}")
        out["modes"][mode] = {"rows": [r.__dict__ for r in rows], "solved": len(solved), "wrong": wrong,
                              "median_s": med, "wall_s": wall}
    console.print(summary)
    path = args.out or REPO / "benchmarks" / "out" / f"refine_{'_'.join(args.modes)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
