"""Split refinement of intermediate bounds, configurations side by side on the same starting bounds.

For each VNN-COMP instance given, the bounds the verifier starts its refinement from (CROWN, then
α-CROWN intermediate bounds) are computed once; then :func:`split_refine_bounds` runs once per
configuration for the same number of seconds, and the table shows what each left: leaves bounded,
unstable neurons of the last hidden block, and the property's worst margin bound over the refined bounds
(α-CROWN, 50 steps; > 0 proves the instance), with the ratio of leaves against the first configuration.
The first configuration is the session-12 default (8 α/β steps per child, rows alike).

    python benchmarks/bench_split_refine.py [--instances 256x6/prop_12_0.05 …] [--seconds 111]
        [--configs "iters=8,focus=off;iters=2,focus=off;iters=2,focus=last"] [--out FILE.json]
    python benchmarks/bench_split_refine.py --bench-dir ../shared/benchmarks/vnncomp2022_oval21 \
        --instances cifar_deep_kw/img1052 --seconds 260 --configs "stall=0.005;stall=0.005,layers=3+4"

``--seconds`` defaults to the refinement's share of a 300 s instance (40 % of what is left after the
first 5 % of branch and bound). One process, one torch thread; run nothing else beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mipprune.verification import crown  # noqa: E402
from mipprune.verification import verify as V  # noqa: E402
from mipprune.verification.bounds import compute_bounds  # noqa: E402
from mipprune.verification.split_refine import split_refine_bounds  # noqa: E402
from solvers.network.ir import Network  # noqa: E402
from solvers.network.spec import make_region  # noqa: E402
from solvers.network.vnnlib import load_vnnlib  # noqa: E402

DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp2022_mnist_fc"
DEFAULT_CONFIGS = "iters=8,focus=off;iters=2,focus=off;iters=2,focus=last"


def _configs(text: str) -> list[dict]:
    out = []
    for part in text.split(";"):
        cfg = {}
        for kv in filter(None, part.split(",")):
            k, v = (x.strip() for x in kv.split("="))
            if k == "layers":            # e.g. layers=3+4: only those hidden blocks
                cfg[k] = [int(x) for x in v.split("+")]
            elif v.lstrip("-").isdigit():
                cfg[k] = int(v)
            else:
                try:
                    cfg[k] = float(v)    # e.g. stall=0.005
                except ValueError:
                    cfg[k] = v
        out.append(cfg)
    return out


def instance_files(bench: Path, inst: str) -> tuple[Path, Path]:
    """``NETWORK/PROPERTY`` → (onnx, vnnlib): ``onnx/NETWORK.onnx`` or MNIST-FC's ``onnx/mnist-net_NETWORK.onnx``;
    ``vnnlib/PROPERTY.vnnlib`` or the one file whose name contains PROPERTY (e.g. ``img1052``)."""
    name, prop = inst.split("/")
    onnx = next((p for p in (bench / "onnx" / f"{name}.onnx", bench / "onnx" / f"mnist-net_{name}.onnx")
                 if p.is_file()), None)
    if onnx is None:
        sys.exit(f"no network {name!r} in {bench / 'onnx'}")
    exact = bench / "vnnlib" / f"{prop}.vnnlib"
    found = [exact] if exact.is_file() else sorted((bench / "vnnlib").glob(f"{name}*{prop}*.vnnlib"))
    if len(found) != 1:
        sys.exit(f"property {prop!r} of {name!r} must name one file in {bench / 'vnnlib'}; found {len(found)}")
    return onnx, found[0]


def starting_bounds(net: Network, spec):
    """CROWN bounds, then the verifier's α stage (:func:`verify._alpha_tighten`) without its time box."""
    blocks = net.to_affine_relu()
    b = compute_bounds(blocks, spec.lower, spec.upper, "crown")
    region = make_region(net.n_inputs, spec.lower, spec.upper)
    b = V._alpha_tighten(blocks, b, region, V._Clock(None), "cpu", [])
    return blocks, b.lower, b.upper


def worst_margin(blocks, lower, upper, spec, C, d) -> float:
    """α-CROWN lower bound (50 steps) of the property's worst margin ``C y + d`` over ``lower, upper``."""
    tn = crown.TorchNet.from_blocks(blocks)
    lo, hi = tn.box(spec.lower, spec.upper)
    L = tn.n_layers
    lb = crown.optimize_bound(tn, [tn.tensor(a)[None] for a in lower[:L - 1]],
                              [tn.tensor(a)[None] for a in upper[:L - 1]], tn.tensor(C)[None], tn.tensor(d)[None],
                              lo, hi, iters=50, want_x=False)[0]
    return float(lb.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--instances", nargs="+", default=["256x6/prop_12_0.05"],
                    help="NETWORK/PROPERTY, e.g. 256x6/prop_12_0.05 (onnx/mnist-net_NETWORK.onnx, "
                         "vnnlib/PROPERTY.vnnlib) or, with --bench-dir …/vnncomp2022_oval21, cifar_deep_kw/img1052 "
                         "(a property named by a part)")
    ap.add_argument("--seconds", type=float, default=111.0)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="';'-separated, each 'key=value,…' (iters, focus, per_row, stall, layers=3+4)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "split_refine.json")
    args = ap.parse_args()
    if not args.bench_dir.is_dir():
        sys.exit(f"benchmark folder {args.bench_dir} is missing (it comes from ../shared/benchmarks)")
    torch.set_num_threads(1)
    console = Console(width=max(Console().width, 140))
    rows = []
    for inst in args.instances:
        onnx, vnnlib = instance_files(args.bench_dir, inst)
        net = Network.from_onnx(onnx)
        spec = load_vnnlib(vnnlib, net.n_inputs, net.n_outputs)[0]
        C, d = V._rows(spec)   # every disjunct's rows: margins C y + d
        t = time.perf_counter()
        blocks, lower, upper = starting_bounds(net, spec)
        console.print(f"{inst}: starting bounds in {time.perf_counter() - t:.1f} s, worst margin "
                      f"{worst_margin(blocks, lower, upper, spec, C, d):.4g}")
        for cfg in _configs(args.configs):
            t = time.perf_counter()
            lw, up, info = split_refine_bounds(blocks, lower, upper, spec.lower, spec.upper, time_limit=args.seconds,
                                               objective=(C, d), **cfg)
            rows.append({"instance": inst, "config": cfg, "seconds": time.perf_counter() - t,
                         "leaves": int(sum(info.leaves)), "unstable_last_before": info.unstable_before[-1],
                         "unstable_last_after": info.unstable_after[-1], "summary": info.summary(),
                         "worst_margin": worst_margin(blocks, lw, up, spec, C, d)})
            console.print(f"  {cfg}: {info.summary()}")
    table = Table(title=f"split refinement, {args.seconds:.0f} s per configuration (one thread)")
    for col in ("instance", "configuration", "leaves", "×leaves", "last refined block unstable",
                "worst margin (> 0 proves)"):
        table.add_column(col, justify="left" if col in ("instance", "configuration") else "right")
    for r in rows:
        base = next(x for x in rows if x["instance"] == r["instance"])
        table.add_row(r["instance"], ",".join(f"{k}={v}" for k, v in r["config"].items()), f"{r['leaves']:,}",
                      f"{r['leaves'] / max(base['leaves'], 1):.2f}",
                      f"{r['unstable_last_before']}→{r['unstable_last_after']}", f"{r['worst_margin']:.4g}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "load_avg_start": os.getloadavg(), "rows": rows}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
