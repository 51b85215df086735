"""VNN-COMP 2022 MNIST-FC: our verifier on the competition's instances, against the competition's tools.

Runs ``mipprune.verification.suite.run_suite`` on ``../shared/benchmarks/vnncomp2022_mnist_fc`` (relative to the
repository root; ``--bench-dir`` overrides) with the instances' own time limits (120 s for 256×2,
300 s otherwise; ``--max-timeout`` / ``--timeout-scale`` shrink them) and prints: solved (sat /
unsat), timeouts, WRONG verdicts (sat/unsat against the competition's consensus; must be 0),
median / mean time over solved instances, and, on exactly the same instances, each competition
tool's correct answers, wrong answers and median raw time from ``ground_truth.csv``. Competition
times come from the VNN-COMP 2022 hardware (AWS, per-tool instance types) and include each tool's
start-up overhead: compare the counts; read the times as orders of magnitude only. The ratio column
is our solved count over each tool's.

``--baseline plain`` also runs the same instances with the pipeline's shortcuts off (interval
bounds, no attack: the bare MILP) in the same run, and reports the time ratio on instances both
solved.

    python benchmarks/bench_vnncomp.py [--network 256x2] [--filter TEXT] [--max-timeout S]
        [--timeout-scale F] [--jobs N] [--backend highs] [--baseline plain] [--out PATH.json]
        [--instances SUBSET.csv] [--bab-options JSON] [--refine auto|split|off|…] [--cuts auto|scip|off]

Writes PATH.json (summary, per-instance rows, machine) and PATH.csv (one row per instance).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mipprune.verification.suite import CSV_FIELDS, instances_path, read_ground_truth, run_suite, summarize, summary_table, write_results_csv

DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_mnist_fc"


def _machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import highspy

        info["highspy"] = getattr(highspy, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    try:
        info["load_avg_start"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    return info


def _run(args, console, label: str, options: dict | None):
    done = {"n": 0, "total": 0}

    def on_start(n):
        done["total"] = n
        console.print(f"[bold]{label}[/]: {n} instances, jobs={args.jobs}")

    def on_result(r):
        done["n"] += 1
        flag = " [red]WRONG[/]" if r.wrong else ""
        console.print(f"  [{done['n']:>3}/{done['total']}] {r.network} {r.property}: {r.verdict:<7} "
                      f"{r.time_s:7.2f} s  {r.stage:<6} bin={r.binaries} nodes={r.nodes}"
                      f" (consensus {r.consensus or '-'}){flag}")

    t0 = time.perf_counter()
    gt_file = instances_path(args.bench_dir).parent / "ground_truth.csv"
    rows = run_suite(args.bench_dir, instances=args.instances, jobs=args.jobs, filter=args.filter,
                     network=args.network,
                     ground_truth=gt_file if gt_file.is_file() else None,
                     timeout_scale=args.timeout_scale, max_timeout=args.max_timeout, backend=args.backend,
                     options=options, on_start=on_start, on_result=on_result)
    return rows, time.perf_counter() - t0


def control_family(args, console) -> None:
    """Small-input family: a 5-input, 6x50 control-policy network (synthetic task, the same as
    tests/mipprune/verification/test_bab.py), properties "action >= threshold is unreachable on a
    box of states" with thresholds just above (unsat-leaning) and below (sat) the sampled maximum.
    Runs verify (auto → input splitting) and the MILP-only pipeline on the same properties."""
    import numpy as np
    import torch

    from mipprune.verification.verify import verify
    from solvers.network.spec import Spec
    from tests.mipprune.verification.test_bab import control_network

    torch.set_num_threads(1)
    net = control_network(0)
    rng = np.random.default_rng(args.seed)
    specs = []
    for k in range(args.n_props):
        c = rng.uniform(-0.6, 0.6, 5)
        lo, hi = c - args.radius, c + args.radius
        ys = net.forward(rng.uniform(lo, hi, (20000, 5)))[:, 0]
        gap = (0.25 if k % 2 == 0 else -0.001) * (ys.max() - ys.min())
        specs.append(Spec(lo, hi, ((np.array([[-1.0]]), np.array([-(ys.max() + gap)])),), name=f"ctrl_{k}"))
    table = Table(title=f"control family: 5 inputs, 6x50 ReLU, {len(specs)} properties, limit {args.control_timeout:g} s")
    for col in ("configuration", "solved", "verified", "falsified", "timeout", "median s", "max s (solved)"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    out = {}
    for label, opts in (("auto (input splitting)", {}), ("MILP only", {"complete": "milp"})):
        rows = []
        for spec in specs:
            r = verify(net, spec, time_limit=args.control_timeout, **opts)
            if r.counterexample is not None:
                assert spec.is_counterexample(net, r.counterexample)
            rows.append({"property": spec.name, "verdict": r.verdict.value, "time_s": r.time, "stage": r.stage})
            console.print(f"  {label:<24} {spec.name:<8} {r.verdict.value:<9} {r.time:7.3f} s  {r.stage}")
        solved = [x for x in rows if x["verdict"] in ("verified", "falsified")]
        times = sorted(x["time_s"] for x in solved)
        med = statistics.median(times) if times else None
        table.add_row(label, f"{len(solved)}/{len(rows)}", str(sum(x["verdict"] == "verified" for x in rows)),
                      str(sum(x["verdict"] == "falsified" for x in rows)),
                      str(sum(x["verdict"] == "timeout" for x in rows)), "-" if med is None else f"{med:.3f}",
                      "-" if not times else f"{times[-1]:.3f}")
        out[label] = rows
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"family": "control", "args": {k: str(v) for k, v in vars(args).items()},
                                    "machine": _machine(), "rows": out}, indent=2))
    console.print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--network", default=None, help="only networks whose file name contains this, e.g. 256x2")
    ap.add_argument("--filter", default=None, help="only instances whose 'network/property' contains this")
    ap.add_argument("--instances", type=Path, default=None,
                    help="an instances CSV (onnx, vnnlib, timeout; paths relative to the CSV or to --bench-dir) "
                         "to run instead of the folder's, e.g. a fixed subset of hard instances")
    ap.add_argument("--bab-options", default=None,
                    help="JSON dict of options for ReLU branch and bound (verify's bab_options=), e.g. "
                         "'{\"iters\": 20}'")
    ap.add_argument("--max-timeout", type=float, default=None, help="cap every time limit (seconds)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--jobs", type=int, default=1, help="instances in parallel (processes)")
    ap.add_argument("--backend", default="highs")
    ap.add_argument("--baseline", choices=["none", "plain", "milp"], default="none",
                    help="also run, on the same instances, the bare MILP (plain: interval bounds, no attack) or "
                         "the full pipeline with the MILP as its only complete method (milp: the pre-BaB verifier)")
    ap.add_argument("--complete", default="auto", choices=["auto", "milp", "bab", "input"],
                    help="complete method after the cheap stages (verify's complete=)")
    ap.add_argument("--device", default="cpu", help="bound engine device for branch and bound")
    ap.add_argument("--precision", default="auto", choices=["auto", "float64", "float32"],
                    help="bound engine dtype (verify's precision=): auto is float64 on cpu, float32 on cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each instance's searches (verify's threads=; with --jobs 1, the idle cores)")
    ap.add_argument("--refine", default="auto", choices=["auto", "split", "after-lp", "instead-of-lp", "off"],
                    help="intermediate-bound refinement before ReLU branch and bound (verify's refine=)")
    ap.add_argument("--cuts", default="auto", choices=["auto", "scip", "off"],
                    help="SCIP root cuts in ReLU branch and bound (verify's cuts=; needs pyscipopt)")
    ap.add_argument("--family", choices=["vnncomp", "control"], default="vnncomp",
                    help="control: the small-input family (5 inputs, 6x50) instead of the VNN-COMP folder")
    ap.add_argument("--n-props", type=int, default=20, help="control family: number of properties")
    ap.add_argument("--radius", type=float, default=0.25, help="control family: half-width of the state boxes")
    ap.add_argument("--control-timeout", type=float, default=60.0, help="control family: seconds per property")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "vnncomp.json")
    args = ap.parse_args()
    console = Console(width=max(Console().width, 110))
    if args.family == "control":
        control_family(args, console)
        return

    gt_file = instances_path(args.bench_dir).parent / "ground_truth.csv"
    gt = read_ground_truth(gt_file) if gt_file.is_file() else {}
    machine = _machine()
    main_opts = {"complete": args.complete, "device": args.device, "refine": args.refine, "threads": args.threads,
                 "precision": args.precision, "cuts": args.cuts}
    if args.bab_options:
        main_opts["bab_options"] = json.loads(args.bab_options)
    rows, wall = _run(args, console, f"mipprune (bounds → attack → LP → {args.complete}: MILP or BaB)", main_opts)
    summary = summarize(rows, gt)
    title = f"{args.bench_dir.name}, {len(rows)} instances" + (f" ({args.network})" if args.network else "")
    console.print(summary_table(summary, title=title))
    limits = sorted({r.timeout_s for r in rows})
    console.print(f"time limits used: {', '.join(f'{t:g}' for t in limits)} s per instance. Tools: VNN-COMP "
                  "2022 answers and raw times (their hardware, start-up overhead included), counted only "
                  "when within the same limit; 'wrong' = sat/unsat against the consensus")

    result = {"benchmark": str(args.bench_dir), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": machine, "wall_s": wall, "summary": summary,
              "rows": [{k: v for k, v in asdict(r).items() if k in CSV_FIELDS} for r in rows]}

    if args.baseline in ("plain", "milp"):
        label, opts = (("baseline: bare MILP (interval bounds, no attack)", {"bounds_method": "interval",
                                                                              "attack": False, "complete": "milp"})
                       if args.baseline == "plain" else
                       ("baseline: bounds → attack → LP → MILP (no branch and bound)", {"complete": "milp"}))
        base_rows, base_wall = _run(args, console, label, opts)
        base = summarize(base_rows, gt)
        pairs = [(r.time_s, b.time_s) for r, b in zip(rows, base_rows) if r.solved and b.solved]
        ratio = statistics.median([b / max(r, 1e-9) for r, b in pairs]) if pairs else None
        bt = Table(title=f"Same run: full pipeline vs baseline ({args.baseline})")
        for c in ("configuration", "solved", "timeout", "wrong", "median s (solved)", "median speed-up"):
            bt.add_column(c, justify="left" if c == "configuration" else "right")
        fmt = lambda t: "-" if t is None else f"{t:.2f}"  # noqa: E731
        bt.add_row(f"bounds → attack → LP → {args.complete}", str(summary["ours"]["solved"]), str(summary["ours"]["timeout"]),
                   str(summary["ours"]["wrong"]), fmt(summary["ours"]["median_time_s"]),
                   "-" if ratio is None else f"{ratio:.1f}×")
        bt.add_row("bare MILP" if args.baseline == "plain" else "pipeline, MILP only", str(base["ours"]["solved"]), str(base["ours"]["timeout"]),
                   str(base["ours"]["wrong"]), fmt(base["ours"]["median_time_s"]), "1.0×")
        console.print(bt)
        result[f"baseline_{args.baseline}"] = {"summary": base, "wall_s": base_wall, "median_speedup_on_both_solved": ratio,
                                    "rows": [{k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
                                             for r in base_rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    write_results_csv(rows, args.out.with_suffix(".csv"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
    if summary["ours"]["wrong"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
