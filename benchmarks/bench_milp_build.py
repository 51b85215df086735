"""MILP model building vs solving, direct highspy arrays vs Pyomo, on VNN-COMP MNIST-FC networks.

For each property: bounds (CROWN, or LP-tightened with ``--bounds lp``), then the big-M model of the
network for the first disjunct's margin, built

* **direct**: :func:`solvers.milp.build_milp` (CSR arrays) + :func:`solvers.milp.to_highs`
  (one ``passModel`` call) — what ``mipprune.verify`` does;
* **pyomo**: the same arrays → :func:`solvers.milp.build_pyomo` (a ``ConcreteModel``) + loading it
  into HiGHS through Pyomo's APPSI interface (``set_instance``), the path of OMLT-style tools;

and then solved once by HiGHS (direct) with the verification cutoff (``margin <= 0``) and a time
limit. The table reports seconds and the ratios pyomo/direct (build) and direct-build/solve.

    python benchmarks/bench_milp_build.py [--network 256x6] [--props 0_0.03,1_0.03,0_0.05]
        [--bounds crown|lp] [--solve-limit 30] [--no-pyomo] [--out benchmarks/out/milp_build.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from solvers import Network, load_vnnlib  # noqa: E402
from mipprune.verification.bounds import compute_bounds  # noqa: E402
from solvers.network.spec import make_region  # noqa: E402
from solvers.milp import build_milp, build_pyomo, solve_highs, to_highs  # noqa: E402
from mipprune.verification.verify import HIGHS_VERIFY_OPTIONS  # noqa: E402

DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_mnist_fc"


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def run_one(net: Network, spec, args) -> dict:
    region = make_region(net.n_inputs, spec.lower, spec.upper, spec.l1_center, spec.l1_radius)
    kw = {"l1_center": spec.l1_center, "l1_radius": spec.l1_radius} if spec.l1_center is not None else {}
    bounds, t_bounds = _timed(compute_bounds, net, spec.lower, spec.upper, args.bounds,
                              time_limit=args.bounds_limit if args.bounds == "lp" else None, **kw)
    A, b = spec.disjuncts[0]
    blocks = net.to_affine_relu()

    def direct():
        m = build_milp(blocks, bounds.lower, bounds.upper, region).with_objective(A[0], -b[0])
        return m, to_highs(m, options=HIGHS_VERIFY_OPTIONS)

    (model, _h), t_direct = _timed(direct)
    t_arrays = model.build_time
    row = {"property": spec.name, "vars": model.n_vars, "binaries": model.n_binaries,
           "constraints": model.n_constraints, "nonzeros": model.n_nonzeros, "bounds_s": t_bounds,
           "arrays_s": t_arrays, "direct_build_s": t_direct}
    if not args.no_pyomo:
        from pyomo.contrib.appsi.solvers import Highs as AppsiHighs

        def via_pyomo():
            m = build_milp(blocks, bounds.lower, bounds.upper, region).with_objective(A[0], -b[0])
            pm = build_pyomo(m)
            opt = AppsiHighs()
            opt.set_instance(pm)
            return pm

        _, t_pyomo = _timed(via_pyomo)
        row["pyomo_build_s"] = t_pyomo
        row["pyomo_over_direct"] = t_pyomo / max(t_direct, 1e-12)
    sol = solve_highs(model, time_limit=args.solve_limit, cutoff=0.0, target=0.0, options=HIGHS_VERIFY_OPTIONS)
    row.update(solve_s=sol.time, solve_status=sol.status.value, nodes=sol.nodes,
               build_over_solve=t_direct / max(sol.time, 1e-12))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--network", default="256x6")
    ap.add_argument("--props", default="0_0.03,1_0.03,0_0.05", help="comma-separated <idx>_<eps>")
    ap.add_argument("--bounds", choices=["crown", "lp"], default="crown")
    ap.add_argument("--bounds-limit", type=float, default=30.0, help="seconds for --bounds lp")
    ap.add_argument("--solve-limit", type=float, default=30.0, help="seconds per MILP solve")
    ap.add_argument("--no-pyomo", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "milp_build.json")
    args = ap.parse_args()
    console = Console(width=max(Console().width, 150))
    import highspy  # noqa: F401  (imports outside the timed regions)
    if not args.no_pyomo:
        import pyomo.environ  # noqa: F401
        from pyomo.contrib.appsi.solvers import Highs  # noqa: F401

    net = Network.from_onnx(args.bench_dir / "onnx" / f"mnist-net_{args.network}.onnx")
    rows = []
    for p in args.props.split(","):
        spec = load_vnnlib(args.bench_dir / "vnnlib" / f"prop_{p}.vnnlib", net.n_inputs, net.n_outputs)[0]
        spec = type(spec)(spec.lower, spec.upper, spec.disjuncts, spec.l1_center, spec.l1_radius, name=f"prop_{p}")
        row = run_one(net, spec, args)
        rows.append(row)
        console.print(f"  {row['property']}: built in {row['direct_build_s']:.3f} s, solve {row['solve_s']:.2f} s "
                      f"({row['solve_status']})")

    t = Table(title=f"MILP build vs solve, mnist-net_{args.network} ({args.bounds} bounds)")
    cols = ["property", "vars", "binaries", "constraints", "nonzeros", "direct build s", "pyomo build s",
            "pyomo/direct", "solve s", "status", "build/solve"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("property", "status") else "right")
    for r in rows:
        t.add_row(r["property"], str(r["vars"]), str(r["binaries"]), str(r["constraints"]), str(r["nonzeros"]),
                  f"{r['direct_build_s']:.4f}", f"{r['pyomo_build_s']:.3f}" if "pyomo_build_s" in r else "-",
                  f"{r['pyomo_over_direct']:.0f}×" if "pyomo_over_direct" in r else "-", f"{r['solve_s']:.2f}",
                  r["solve_status"], f"{r['build_over_solve']:.4f}")
    console.print(t)
    def med(k):
        vals = [r[k] for r in rows if k in r]
        return float(np.median(vals)) if vals else None
    summary = {"median_direct_build_s": med("direct_build_s"), "median_pyomo_build_s": med("pyomo_build_s"),
               "median_pyomo_over_direct": med("pyomo_over_direct"), "median_build_over_solve": med("build_over_solve")}
    console.print(summary)
    out = {"network": args.network, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "summary": summary, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "load_avg": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
