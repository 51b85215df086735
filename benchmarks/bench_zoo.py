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


def main() -> None:
    import copy

    from benchmarks.tv_shim import import_torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = import_torchvision()
    rows = []
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
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
