"""How much would a MILP solver's cutting planes add to the verifier's root bound? (issue 13's next lever)

α,β-CROWN's OVAL21 configurations add cutting planes to bound propagation (GCP-CROWN: cuts from a MIP solver's
root node; BICCOS: cuts from the branch and bound's own verified sub-domains). Before building that propagation
this study measures what HiGHS's root cuts are worth on an instance, and whether they can be had in time:

1. the bounds the verifier starts branch and bound from (CROWN, then α-CROWN intermediate bounds, as
   ``verify`` computes them) and the MILP of the worst open disjunct on them (``build_milp``);
2. its LP relaxation (the triangle relaxation, which α/β-CROWN's root bound approaches);
3. HiGHS's root node with cut separation for ``--seconds`` (one thread, presolve off so that cuts are in the
   model's own columns, heuristics off), its dual bound over time (the MIP logging callback), and the cut pool
   where HiGHS hands it over (``cbMipGetCutPool``: only once the root's separation loop has ended);
4. with a pool: the LP with the pool's cuts added, and how many of the cuts the incumbent violates (HiGHS's pool
   can hold cuts valid only for points better than the incumbent: usable to prove "no counterexample" only while
   the incumbent's margin is positive);
5. with a pool: the same row bounded by back-substitution with the pool's cuts (and the disjunct's other rows, which
   the MILP holds as constraints) entering through multipliers — GCP-CROWN (:mod:`mipprune.verification.cuts`) —
   against the same optimizer without cuts (``--gcp-iters`` Adam steps each).

    python benchmarks/study_root_cuts.py --bench-dir ../shared/benchmarks/vnncomp2022_oval21 --filter img1052 \
        [--filter TEXT …] [--seconds 60] [--out benchmarks/out/study_root_cuts.json]

Prints one table row per instance and writes PATH.json. A study, not a test: nothing here is used by ``verify``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_oval21"


def _gcp(blocks, bounds, model, A, b, r, pool, iters: int) -> dict:
    """Row ``r`` of ``A y − b`` bounded by :func:`optimize_cut_bound` on the MILP's intermediate bounds, without
    cuts, with the disjunct's other rows only, and with those and the pool's cuts (two-sided rows split)."""
    import torch

    from mipprune.verification import crown
    from mipprune.verification.cuts import cuts_from_columns, optimize_cut_bound

    tn = crown.TorchNet.from_blocks(blocks, dtype=torch.float64)
    M, bias = model.out_map
    others = np.delete(np.arange(A.shape[0]), r)
    out_coef, out_d = sp.csr_matrix(A[others] @ M), b[others] - A[others] @ bias      # other rows: A_o y <= b_o
    n = pool["n"]
    P = sp.csr_matrix((pool["value"], pool["index"], pool["start"][:n + 1]), shape=(n, model.n_vars))
    up, lo = pool["upper"], pool["lower"]
    fin_up, fin_lo = np.abs(up) < 1e20, np.abs(lo) < 1e20
    pool_coef = sp.vstack([P[fin_up], -P[fin_lo]])
    pool_d = np.concatenate([up[fin_up], -lo[fin_lo]])
    lower = [tn.tensor(a)[None] for a in bounds.lower[:-1]]
    upper = [tn.tensor(a)[None] for a in bounds.upper[:-1]]
    L, U = tn.box(model.col_lower[model.x_cols], model.col_upper[model.x_cols])
    C, c0 = tn.tensor(A[r])[None, None], tn.tensor([-b[r]])[None]
    res = {}
    for name, coef, d in (("none", sp.csr_matrix((0, model.n_vars)), np.zeros(0)),
                          ("rows", out_coef, out_d),
                          ("rows+pool", sp.vstack([out_coef, pool_coef]), np.concatenate([out_d, pool_d]))):
        cuts = cuts_from_columns(model, coef, d, tn)
        t = time.perf_counter()
        lb = optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=iters)
        res[name] = {"bound": float(lb), "cuts": cuts.K, "seconds": time.perf_counter() - t}
    return res


def study(onnx_path: Path, vnnlib_path: Path, seconds: float, gcp_iters: int = 300) -> dict:
    import torch

    from mipprune.verification.bounds import _compute
    from mipprune.verification.verify import _alpha_tighten, _Clock, _disjunct_model, _row_margins
    from solvers.milp import build_milp, to_highs
    from solvers.network.ir import Network
    from solvers.network.spec import make_region
    from solvers.network.vnnlib import load_vnnlib

    torch.set_num_threads(2)
    net = Network.from_onnx(onnx_path)
    spec = load_vnnlib(vnnlib_path, net.n_inputs, net.n_outputs)[0]
    blocks = net.to_affine_relu()
    region = make_region(net.n_inputs, spec.lower, spec.upper, spec.l1_center, spec.l1_radius)
    row: dict = {"instance": f"{onnx_path.stem}/{vnnlib_path.stem}"}
    t = time.perf_counter()
    bounds = _compute(blocks, region, "crown", t, None)
    row["crown_margin"] = float(_row_margins(blocks, bounds, region, spec)[0].min())
    bounds = _alpha_tighten(blocks, bounds, region, _Clock(600.0), "cpu", [])
    margins = _row_margins(blocks, bounds, region, spec)[0]
    row["alpha_margin"] = float(margins.min())
    row["time_bounds"] = time.perf_counter() - t
    row["unstable"] = [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in zip(bounds.lower[:-1], bounds.upper[:-1])]
    offs = np.concatenate([[0], np.cumsum([A.shape[0] for A, _ in spec.disjuncts])])
    j = int(np.searchsorted(offs, int(np.argmin(margins)), side="right") - 1)
    A, b = spec.disjuncts[j]
    r = int(np.argmax(margins[offs[j]:offs[j + 1]]))        # the row _disjunct_model minimizes
    model = _disjunct_model(build_milp(blocks, bounds.lower, bounds.upper, region), A, b, margins[offs[j]:offs[j + 1]])
    row.update(disjunct=j, vars=model.n_vars, rows=model.n_constraints, binaries=model.n_binaries)

    h = to_highs(model, options={"solve_relaxation": True})
    t = time.perf_counter()
    h.run()
    row["lp_bound"] = float(h.getInfo().objective_function_value)
    row["time_lp"] = time.perf_counter() - t

    trace: list[tuple[float, float]] = []             # (seconds, root dual bound) per display line
    pool: dict = {}

    def on_log(e):
        d = e.data_out
        trace.append((round(float(d.running_time), 2), float(d.mip_dual_bound)))

    def on_pool(e):
        d = e.data_out
        n = int(d.cutpool_num_cut)
        start = np.array(d.cutpool_start, copy=True)
        pool.update(n=n, start=start if start.size > n else np.append(start, len(d.cutpool_index)),
                    index=np.array(d.cutpool_index, copy=True), value=np.array(d.cutpool_value, copy=True),
                    lower=np.array(d.cutpool_lower, copy=True), upper=np.array(d.cutpool_upper, copy=True),
                    at=time.perf_counter() - t0)

    h2 = to_highs(model, options={"time_limit": seconds, "mip_max_nodes": 1, "threads": 1, "presolve": "off",
                                  "mip_heuristic_effort": 0.0,
                                  "output_flag": True, "log_to_console": False})   # (display lines: the logging callback)
    h2.cbMipLogging.subscribe(on_log)
    h2.cbMipGetCutPool.subscribe(on_pool)
    t0 = time.perf_counter()
    h2.run()
    info = h2.getInfo()
    row["root_dual_bound"] = float(info.mip_dual_bound)
    row["root_time"] = time.perf_counter() - t0
    row["root_status"] = h2.modelStatusToString(h2.getModelStatus())
    row["dual_bound_trace"] = trace
    row["pool_delivered"] = bool(pool)
    if pool:
        n = pool["n"]
        lo, up = pool["lower"], pool["upper"]                 # (HiGHS's own infinities: passed back as they are)
        h3 = to_highs(model, options={"solve_relaxation": True})
        h3.addRows(n, lo, up, pool["index"].size, pool["start"][:n].astype(np.int32),
                   pool["index"].astype(np.int32), pool["value"])
        h3.run()
        row.update(pool_cuts=n, pool_at=pool["at"], lp_with_pool=float(h3.getInfo().objective_function_value))
        sol = np.array(h2.getSolution().col_value)
        if info.primal_solution_status == 2 and sol.size == model.n_vars:
            cuts = sp.csr_matrix((pool["value"], pool["index"], pool["start"]), shape=(n, model.n_vars))
            act = cuts @ sol
            row["incumbent"] = float(model.cost @ sol + model.offset)
            row["cuts_violated_by_incumbent"] = int((np.maximum(act - up, lo - act) > 1e-6).sum())
        if not any(blk.pool is not None for blk in blocks):
            row["gcp"] = _gcp(blocks, bounds, model, A, b, r, pool, gcp_iters)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--filter", action="append", default=[],
                    help="only instances whose 'onnx vnnlib' paths contain this text (repeatable: all must match)")
    ap.add_argument("--seconds", type=float, default=60.0, help="HiGHS root node time limit")
    ap.add_argument("--gcp-iters", type=int, default=300, help="Adam steps of each cut-propagation bound")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "study_root_cuts.json")
    args = ap.parse_args()
    if not args.bench_dir.is_dir():
        sys.exit(f"no benchmark directory at {args.bench_dir} (the shared VNN-COMP files sit in ../shared)")
    with open(args.bench_dir / "instances.csv") as f:
        todo = [(r[0], r[1]) for r in csv.reader(f) if r and all(t in f"{r[0]} {r[1]}" for t in args.filter)]
    rows = []
    for onnx_rel, vnn_rel in todo:
        rows.append(study(args.bench_dir / onnx_rel, args.bench_dir / vnn_rel, args.seconds, args.gcp_iters))
    table = Table(title=f"Root bounds of the worst open disjunct: LP against HiGHS's root cuts ({args.seconds:g} s)")
    for col in ("instance", "α-CROWN", "LP", "root + cuts", "LP gap closed", "root s", "pool", "LP + pool",
                "cuts violated by incumbent", "GCP: no cuts", "GCP: other rows", "GCP: rows + pool"):
        table.add_column(col, justify="left" if col == "instance" else "right")
    for r in rows:
        closed = (r["root_dual_bound"] - r["lp_bound"]) / max(-r["lp_bound"], 1e-12) if r["lp_bound"] < 0 else None
        table.add_row(r["instance"], f"{r['alpha_margin']:.4f}", f"{r['lp_bound']:.4f}", f"{r['root_dual_bound']:.4f}",
                      "–" if closed is None else f"{closed:.0%}", f"{r['root_time']:.0f}",
                      f"{r['pool_cuts']} at {r['pool_at']:.0f} s" if r["pool_delivered"] else "not delivered",
                      f"{r['lp_with_pool']:.4f}" if r["pool_delivered"] else "–",
                      str(r.get("cuts_violated_by_incumbent", "–")),
                      *(f"{r['gcp'][k]['bound']:.4f}" if "gcp" in r else "–" for k in ("none", "rows", "rows+pool")))
    Console(width=200).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": args.seconds, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
