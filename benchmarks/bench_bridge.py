"""Activation bridge: streaming Gram statistics vs materialize-then-multiply, peak memory and time.

One 3×3 conv layer with C_in = 256 (256 → 256 on S×S maps, default 8×8), calibration batches of
random inputs generated on the fly (same seed for both methods), ``positions`` sampled output
positions per image, until ``--samples`` rows of Z (default 50,000; d = 256·9 = 2,304 columns):

* streaming (ours): ``mipprune.capture`` — hooks unfold the sampled patches per batch and add
  ZᵀZ, ZᵀY, ‖Y‖² into float64 accumulators; nothing grows with the number of batches.
* materialize (baseline): the same hooks and the same sampled patches, but Z and Y are kept for
  every batch, concatenated, converted to float64, and multiplied once at the end.

Each method runs in a fresh subprocess. Peak memory on CPU is the peak resident set size above the
level just before the method starts (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``), which counts torch and numpy buffers alike; on CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation at start. Time is wall-clock for the whole
pass (forward passes included, the same for both); the forward-only pass is reported for reference.
Both Gram matrices are compared (max relative difference) to show they are the same statistics.

    python benchmarks/bench_bridge.py [--device cpu|cuda] [--size 8] [--samples 50000]
                                      [--positions 32] [--batch 50] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("forward-only", "streaming", "materialize")


# ----------------------------------------------------------------------------- worker side
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _data(args, device):
    import torch

    g = torch.Generator().manual_seed(args.seed)
    images = -(-args.samples // min(args.positions, args.size * args.size))
    for start in range(0, images, args.batch):
        n = min(args.batch, images - start)
        yield torch.randn(n, args.channels, args.size, args.size, generator=g).to(device)


def worker(args) -> dict:
    import torch
    from torch import nn

    from mipprune.pruning.bridge import capture, layer_generator, sample_conv_rows

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = nn.Sequential(nn.Conv2d(args.channels, args.channels, 3, padding=1)).to(device).eval()
    conv = model[0]
    with torch.no_grad():  # warm-up: load kernels, allocator pools
        model(torch.randn(2, args.channels, args.size, args.size, device=device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_ok = _reset_peak()
        base = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    gram = None
    if args.worker == "forward-only":
        with torch.no_grad():
            for x in _data(args, device):
                model(x)
    elif args.worker == "streaming":
        stats = capture(model, _data(args, device), ["0"], positions=args.positions,
                        max_samples=args.samples, seed=args.seed)["0"]
        gram, n = stats.gram, stats.n_samples
    else:  # materialize: keep every sampled row, then multiply once
        zs, ys = [], []
        gen = layer_generator("0", args.seed)  # the same positions capture samples
        bias = conv.bias.detach()

        def hook(_m, inp, out):
            z, (img, oy, ox) = sample_conv_rows(conv, inp[0], args.positions, gen)
            zs.append(z)
            ys.append(out[img, :, oy, ox] - bias)

        h = conv.register_forward_hook(hook)
        with torch.no_grad():
            for x in _data(args, device):
                model(x)
        h.remove()
        Z = torch.cat(zs)[: args.samples]
        Y = torch.cat(ys)[: args.samples]
        del zs, ys
        if cuda:
            Z, Y = Z.double(), Y.double()
            G, B, yy = Z.T @ Z, Z.T @ Y, float((Y * Y).sum())
            gram = G.cpu().numpy()
        else:
            Zn, Yn = Z.numpy().astype(np.float64), Y.numpy().astype(np.float64)
            gram, B, yy = Zn.T @ Zn, Zn.T @ Yn, float(np.sum(Yn * Yn))
        n = Z.shape[0]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base if reset_ok else None
    out = {"method": args.worker, "seconds": elapsed, "peak_bytes": peak,
           "rows": None if gram is None else int(n)}
    if gram is not None and args.gram_out:
        np.save(args.gram_out, gram)
    return out


# ----------------------------------------------------------------------------- driver side
def _run_worker(method: str, args, gram_path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--device", args.device, "--channels", str(args.channels),
           "--size", str(args.size), "--samples", str(args.samples), "--positions", str(args.positions),
           "--batch", str(args.batch), "--seed", str(args.seed), "--threads", str(args.threads)]
    if gram_path:
        cmd += ["--gram-out", gram_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--channels", type=int, default=256, help="input = output channels of the conv")
    ap.add_argument("--size", type=int, default=8, help="feature-map side S (S×S maps)")
    ap.add_argument("--samples", type=int, default=50_000, help="rows of Z (sampled positions)")
    ap.add_argument("--positions", type=int, default=32, help="sampled positions per image")
    ap.add_argument("--batch", type=int, default=50, help="images per batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_bridge.json")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--gram-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from rich.console import Console
    from rich.table import Table

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("CUDA is not available; run with --device cpu", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for method in METHODS:
            path = None if method == "forward-only" else os.path.join(tmp, f"{method}.npy")
            results[method] = _run_worker(method, args, path)
        g_s, g_m = np.load(os.path.join(tmp, "streaming.npy")), np.load(os.path.join(tmp, "materialize.npy"))
        agreement = float(np.max(np.abs(g_s - g_m)) / np.max(np.abs(g_m)))

    d = args.channels * 9
    base = results["materialize"]
    rows = []
    for method in METHODS:
        r = results[method]
        peak = r["peak_bytes"]
        rows.append({
            **r,
            "peak_mib": None if peak is None else peak / 2**20,
            "memory_ratio": (base["peak_bytes"] / peak) if peak and base["peak_bytes"] else None,
            "time_ratio": base["seconds"] / r["seconds"],
        })
    materialized_bytes = args.samples * (d + args.channels) * 4  # Z and Y rows as float32

    title = (f"Bridge statistics: conv {args.channels}→{args.channels} 3×3 on {args.size}×{args.size}, "
             f"{args.samples:,} sampled positions (d = {d:,}), device {args.device}")
    table = Table(title=title)
    for col in ("method", "rows", "peak memory MiB", "time s", "memory: baseline / this", "time: baseline / this"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], "-" if r["rows"] is None else f"{r['rows']:,}",
                      "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}", f"{r['seconds']:.2f}",
                      "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}×",
                      f"{r['time_ratio']:.2f}×")
    console = Console(width=130)
    console.print(table)
    console.print(f"Z and Y as float32 hold {materialized_bytes / 2**20:.0f} MiB; "
                  f"max |G_streaming − G_materialized| / max |G| = {agreement:.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bridge", "python": platform.python_version(), "machine": platform.machine(),
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "gram_out")},
        "materialized_float32_bytes": materialized_bytes, "gram_max_rel_diff": agreement, "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
