"""Coverage and speed on the torchvision zoo: mipprune's channel groups vs Torch-Pruning (magnitude).

For every model, both tools remove half of the channels of every group they can cut, ranking units
by the L1 norm of the producers' weight rows (no calibration on either side, so the comparison is of
the dependency analysis and the surgery), and the table shows: groups found (prunable / all),
Conv2d+Linear layers touched, parameter and FLOPs ratios after pruning, whether the pruned model runs
and matches the original's output shape, and seconds. mipprune's reachable FLOPs floor (one unit
kept per prunable group) is shown too — the old pair analysis failed on all of these models.

Not part of the package or the test suite. Needs torchvision and torch-pruning, installed aside:

    pip install --no-deps --target /tmp/tvpkgs torchvision torch-pruning
    PYTHONPATH=/tmp/tvpkgs:. .venv/bin/python benchmarks/bench_zoo.py [--models resnet18,…] [--size 64]

(torchvision's PyPI wheel does not import beside the CPU torch: see benchmarks/tv_shim.py).
Writes benchmarks/out/bench_zoo.json.

``--targets 0.5,0.25``: both tools land FLOPs fractions instead (ours: uniform widths from the exact cost
polynomial, L1 ranking; Torch-Pruning: its ratio bisected, all tries timed), table + bench_zoo_flops.json.
``--lasso N --size 224 --models resnet50 --targets 0.5``: ``ChannelSelector("lasso", flops=…)`` on N random
calibration images, seconds and peak memory (logged every 2 s, so a time-boxed run still reports).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "mnasnet0_5", "regnet_y_400mf", "squeezenet1_0", "densenet121", "shufflenet_v2_x0_5", "vgg11_bn",
          "alexnet", "googlenet", "convnext_tiny"]


def _count(model, x):
    from mipprune.train import count_flops

    return sum(p.numel() for p in model.parameters()), count_flops(model, tuple(x.shape[1:]))


def ours(model: nn.Module, x: torch.Tensor) -> dict:
    from mipprune.pruning.channel_graph import build_channel_graph
    from mipprune.pruning.group_budget import group_cost
    from mipprune.pruning.group_surgery import prune_groups

    t0 = time.perf_counter()
    graph = build_channel_graph(model, x)
    t_graph = time.perf_counter() - t0
    mods = dict(model.named_modules())
    masks = {}
    for g in graph.prunable:
        score = np.zeros(g.n_units)
        for m in g.members:
            if m.role in ("producer", "grouped"):
                w = mods[m.module].weight.detach().abs().reshape(m.units.size, -1).sum(1).numpy()
                np.add.at(score, m.units[m.units >= 0], w[m.units >= 0])
        keep = np.zeros(g.n_units, dtype=bool)
        keep[np.argsort(-score)[: max(1, round(g.n_units / 2))]] = True
        masks[g.id] = keep
    pruned = prune_groups(model, graph, masks, example_input=x)
    t_total = time.perf_counter() - t0
    touched = {m.module for g in graph.prunable for m in g.members} & set(graph.layers)
    floor = group_cost(model, graph, x, "flops").floor()
    return {"groups": len(graph.prunable), "all_groups": len(graph.groups), "layers_touched": len(touched),
            "layers": len(graph.layers), "flops_floor": floor, "time_graph": t_graph, "time": t_total,
            "pruned": pruned}


def torch_pruning(model: nn.Module, x: torch.Tensor) -> dict:
    import torch_pruning as tp

    t0 = time.perf_counter()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:] or \
           [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1:]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=last)
    groups = list(pruner.DG.get_all_groups(ignored_layers=last, root_module_types=[nn.Conv2d, nn.Linear]))
    pruner.step()
    return {"groups": len(groups), "time": time.perf_counter() - t0, "pruned": model}


# ----------------------------------------------------------------------------- FLOPs targets (--targets)
def ours_flops(model: nn.Module, x: torch.Tensor, target: float) -> dict:
    """Ours at a FLOPs target without calibration: the channel graph, the exact cost polynomial,
    :func:`~mipprune.pruning.group_budget.uniform_widths` (the same fraction of every group, landing in
    [0.995 t, t]), the producers' L1 norms to rank units, and the surgery."""
    from mipprune.pruning.channel_graph import build_channel_graph
    from mipprune.pruning.group_budget import group_cost, uniform_widths
    from mipprune.pruning.group_surgery import prune_groups

    t0 = time.perf_counter()
    graph = build_channel_graph(model, x)
    widths = uniform_widths(group_cost(model, graph, x, "flops"), target)
    mods = dict(model.named_modules())
    masks = {}
    for g in graph.prunable:
        if widths.get(g.name, g.n_units) >= g.n_units:
            continue
        score = np.zeros(g.n_units)
        for m in g.members:
            if m.role in ("producer", "grouped"):
                w = mods[m.module].weight.detach().abs().reshape(m.units.size, -1).sum(1).numpy()
                np.add.at(score, m.units[m.units >= 0], w[m.units >= 0])
        keep = np.zeros(g.n_units, dtype=bool)
        keep[np.argsort(-score)[: widths[g.name]]] = True
        masks[g.id] = keep
    pruned = prune_groups(model, graph, masks, example_input=x)
    return {"groups": len(graph.prunable), "time": time.perf_counter() - t0, "pruned": pruned}


def tp_flops(model: nn.Module, x: torch.Tensor, target: float, tries: int = 14) -> dict:
    """Torch-Pruning (magnitude, uniform ratio) stepped to a FLOPs target: the ratio is bisected until
    the FLOPs land in [0.995 t, t] (or the largest ≤ t after ``tries``); the time is all tries'."""
    import copy

    import torch_pruning as tp
    from mipprune.train import count_flops

    t0 = time.perf_counter()
    f0 = count_flops(model, tuple(x.shape[1:]))
    lo, hi, r, best, n = 0.0, 0.999, 1.0 - target ** 0.5, None, 0
    for n in range(1, tries + 1):
        m = copy.deepcopy(model)
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:] or \
               [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)][-1:]
        tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r,
                             ignored_layers=last).step()
        ratio = count_flops(m, tuple(x.shape[1:])) / f0
        if ratio <= target:
            hi, best = r, m
            if ratio >= 0.995 * target:
                break
        else:
            lo = r
        r = (lo + hi) / 2
    if best is None:
        raise RuntimeError(f"no ratio reached FLOPs <= {target} in {tries} tries")
    return {"tries": n, "ratio": hi, "time": time.perf_counter() - t0, "pruned": best}


def lasso_run(model: nn.Module, size: int, n_images: int, target: float, log: Path) -> dict:
    """``ChannelSelector("lasso", flops=target)`` on ``n_images`` random calibration images: seconds and
    peak resident memory (sampled every 2 s into ``log`` as well, so a run stopped by a time box still
    tells how far it got and what it held)."""
    import threading

    from mipprune.data import make_loader
    from mipprune.pruning.selector import ChannelSelector

    def memory() -> tuple[float, float]:  # (resident, peak resident) GiB of this process, from the kernel
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))

    stop = threading.Event()
    t0 = time.perf_counter()

    def sample():
        with log.open("a") as f:
            while not stop.wait(2.0):
                rss, peak = memory()
                f.write(json.dumps({"t": round(time.perf_counter() - t0, 1), "rss_gib": round(rss, 3),
                                    "peak_gib": round(peak, 3)}) + "\n")
                f.flush()

    import mipprune.pruning.group_pruning as gp

    capture = gp.capture

    def traced_capture(model, data, names, **kw):  # log which group the run has reached
        with log.open("a") as f:
            f.write(json.dumps({"t": round(time.perf_counter() - t0, 1), "capture": list(names)[:4],
                                "consumers": len(names)}) + "\n")
        return capture(model, data, names, **kw)

    gp.capture = traced_capture
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    x = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    sel = ChannelSelector("lasso", flops=target, progress=True).fit(model, make_loader(x, batch_size=32))
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    b = sel.budget_ or {}
    return {"time": elapsed, "peak_rss_gib": memory()[1], "achieved_ratio": b.get("achieved_ratio"),
            "in_window": b.get("in_window"), "curve_time": b.get("curve_time"), "groups": len(sel.groups_),
            "skipped": dict(getattr(sel, "skipped_", {}) or {})}


def main() -> None:
    import copy

    from benchmarks.tv_shim import import_torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default=None,
                        help="FLOPs fractions to keep (e.g. 0.5,0.25): both tools land each target (ours: uniform "
                             "widths from the cost polynomial; TP: bisected ratio) instead of removing half the "
                             "channels; writes bench_zoo_flops.json")
    parser.add_argument("--lasso", type=int, default=None, metavar="N",
                        help="instead: ChannelSelector('lasso', flops=first target) on N random calibration images "
                             "per model, seconds and peak memory; writes bench_zoo_lasso_<model>_<size>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = import_torchvision()
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "threads": args.threads, "input_size": args.size, "torch": torch.__version__}
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    targets = [float(t) for t in (args.targets or "0.5").split(",")]
    if args.lasso:
        for name in args.models.split(","):
            model = getattr(tv.models, name)().eval()
            stem = f"bench_zoo_lasso_{name}_{args.size}"
            log = out / f"{stem}.log"
            log.write_text("")
            print(f"{name} {args.size}x{args.size}, lasso, flops={targets[0]}, {args.lasso} images "
                  f"(memory/progress log: {log})", flush=True)
            r = lasso_run(model, args.size, args.lasso, targets[0], log)
            print(f"{name:20s} lasso: {r['time']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, FLOPs "
                  f"{r['achieved_ratio']:.4f} (in window: {r['in_window']}), curves {r['curve_time']:.0f} s", flush=True)
            (out / f"{stem}.json").write_text(json.dumps(dict(meta, model=name, images=args.lasso, target=targets[0],
                                                               **r), indent=2))
        return
    if args.targets:
        rows = []
        print(f"| model | target | ours groups | ours FLOPs | ours s | TP FLOPs | TP s (tries) | ours/TP time |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            model = getattr(tv.models, name)().eval()
            base_p, base_f = _count(model, x)
            for t in targets:
                row = {"model": name, "target": t}
                for tool, fn in (("mipprune", ours_flops), ("torch_pruning", tp_flops)):
                    try:
                        r = fn(copy.deepcopy(model), x, t)
                        pruned = r.pop("pruned")
                        with torch.no_grad():
                            y = pruned(x)
                        p, f = _count(pruned, x)
                        r.update(ok=y.shape[-1] == 1000, params_ratio=p / base_p, flops_ratio=f / base_f,
                                 in_window=bool(0.995 * t <= f / base_f <= t))
                    except Exception as exc:  # a tool failing on a model is a result
                        r = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    row[tool] = r
                rows.append(row)
                m, tpr = row["mipprune"], row["torch_pruning"]

                def cell(r, key, spec):
                    return format(r[key], spec) if key in r else r.get("error", "-")[:50]

                print(f"| {name} | {t:g} | {m.get('groups', '-')} | {cell(m, 'flops_ratio', '.4f')} | "
                      f"{cell(m, 'time', '.2f')} | {cell(tpr, 'flops_ratio', '.4f')} | {cell(tpr, 'time', '.2f')} "
                      f"({tpr.get('tries', '-')}) | "
                      f"{m['time'] / tpr['time'] if 'time' in m and 'time' in tpr else float('nan'):.2f} |", flush=True)
                (out / "bench_zoo_flops.json").write_text(json.dumps(dict(meta, rows=rows), indent=2))
        return
    rows = []
    for name in args.models.split(","):
        model = getattr(tv.models, name)().eval()
        with torch.no_grad():
            ref = model(x)
        base_p, base_f = _count(model, x)
        row = {"model": name, "params": base_p, "flops": base_f}
        for tool, fn in (("mipprune", ours), ("torch_pruning", torch_pruning)):
            try:
                r = fn(copy.deepcopy(model), x)  # Torch-Pruning traces with autograd: no no_grad here
                out = r.pop("pruned")
                with torch.no_grad():
                    y = out(x)
                p, f = _count(out, x)
                r.update(ok=tuple(y.shape) == tuple(ref.shape), params_ratio=p / base_p, flops_ratio=f / base_f)
            except Exception as exc:  # a tool failing on a model is a result, not a crash of the benchmark
                r = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            row[tool] = r
        rows.append(row)
        m, t = row["mipprune"], row["torch_pruning"]
        print(f"{name:20s} ours: {m.get('groups', '-')}/{m.get('all_groups', '-')} groups, layers "
              f"{m.get('layers_touched', '-')}/{m.get('layers', '-')}, params {m.get('params_ratio', float('nan')):.3f}, "
              f"flops {m.get('flops_ratio', float('nan')):.3f}, floor {m.get('flops_floor', float('nan')):.4f}, "
              f"{m.get('time', float('nan')):.2f}s {'ok' if m['ok'] else m.get('error')} | TP: {t.get('groups', '-')} groups, "
              f"params {t.get('params_ratio', float('nan')):.3f}, flops {t.get('flops_ratio', float('nan')):.3f}, "
              f"{t.get('time', float('nan')):.2f}s {'ok' if t['ok'] else t.get('error')} | time ratio "
              f"{m.get('time', float('nan')) / t.get('time', float('nan')):.2f}", flush=True)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_zoo.json").write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "threads": args.threads, "input_size": args.size, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
