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
import os
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


def l1_masks(model: nn.Module, graph, widths: dict) -> dict:
    """{group id: kept units} of every group narrower in ``widths`` than its ``n_units``: units ranked by
    the L1 norms of their rows in every producer and grouped conv of the group (no calibration)."""
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
    return masks


def ours(model: nn.Module, x: torch.Tensor) -> dict:
    from mipprune.pruning.channel_graph import build_channel_graph
    from mipprune.pruning.group_budget import group_cost
    from mipprune.pruning.group_surgery import prune_groups

    t0 = time.perf_counter()
    graph = build_channel_graph(model, x)
    t_graph = time.perf_counter() - t0
    masks = l1_masks(model, graph, {g.name: max(1, round(g.n_units / 2)) for g in graph.prunable})
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
    masks = l1_masks(model, graph, widths)
    pruned = prune_groups(model, graph, masks, example_input=x)
    return {"groups": len(graph.prunable), "time": time.perf_counter() - t0, "pruned": pruned}


def tp_flops(model: nn.Module, x: torch.Tensor, target: float, tries: int = 14) -> dict:
    """Torch-Pruning (magnitude, uniform ratio) stepped to a FLOPs target: the ratio is bisected until
    the FLOPs land in [0.995 t, t] (or the largest ≤ t after ``tries``); the time is all tries'."""
    import copy

    import torch_pruning as tp
    from mipprune.train import count_flops

    from benchmarks.tp_ratio import bisect_ratio

    t0 = time.perf_counter()
    f0 = count_flops(model, tuple(x.shape[1:]))
    groups, t_groups = None, 0.0

    def flops_at(r):
        nonlocal groups, t_groups
        m = copy.deepcopy(model)
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:] or \
               [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)][-1:]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r,
                                      ignored_layers=last)
        if groups is None:  # counted once, for the table; its time is not charged to Torch-Pruning
            tg = time.perf_counter()
            groups = len(list(pruner.DG.get_all_groups(ignored_layers=last,
                                                       root_module_types=[nn.Conv2d, nn.Linear])))
            t_groups = time.perf_counter() - tg
        pruner.step()
        return m, count_flops(m, tuple(x.shape[1:])) / f0

    best, n = bisect_ratio(flops_at, target, tries)
    if best is None:
        raise RuntimeError(f"no ratio reached FLOPs <= {target} in {tries} tries")
    return {"tries": n, "ratio": best[0], "groups": groups, "time": time.perf_counter() - t0 - t_groups,
            "pruned": best[2]}


def _cpu_seconds() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def lasso_run(model: nn.Module, size: int, n_images: int, target: float, log: Path,
              max_memory: int | None = None) -> dict:
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
    cpu0 = _cpu_seconds()
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
    kw = {} if max_memory is None else {"max_memory": max_memory}
    sel = ChannelSelector("lasso", flops=target, progress=True, **kw).fit(model, make_loader(x, batch_size=32))
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    b = sel.budget_ or {}
    rows = getattr(sel, "_rows", {}) or {}
    phases = {k: sum(r.get(k, 0.0) for r in rows.values()) for k in ("capture_time", "select_time", "surgery_time")}
    return {"time": elapsed, "peak_rss_gib": memory()[1], "achieved_ratio": b.get("achieved_ratio"),
            "in_window": b.get("in_window"), "curve_time": b.get("curve_time"), "groups": len(sel.groups_),
            "skipped": dict(getattr(sel, "skipped_", {}) or {}), "load_average": list(os.getloadavg()),
            "cpu_time": _cpu_seconds() - cpu0,  # user + system: what a shared machine does not inflate
            **phases, "calibration": {g: r.get("calibration") for g, r in rows.items()}}


# ----------------------------------------------------------------------------- coverage (--coverage)
# Every torchvision classification model × tool runs in its own subprocess with a timeout and a memory
# cap, so a crash, a hang or a memory blow-up of either tool is a recorded result and the peak memory
# is the child's own (os.wait4's ru_maxrss; per target, VmHWM reset through /proc/self/clear_refs).
COVERAGE_TOOLS = {"tp": "Torch-Pruning magnitude (ratio bisected to the FLOPs target)",
                  "ours": "ours magnitude (uniform widths from the cost polynomial, L1 ranking)",
                  "lasso": "ours ChannelSelector('lasso', flops=t) on random calibration images"}


def coverage_size(name: str, size: int) -> int:
    """Input side: ``size`` (64), 224 for ViT/Swin/MaxViT (fixed-size patch/window grids), and 128
    for inception_v3 (its stride-2 stages need at least 75 pixels)."""
    if name.startswith(("vit_", "swin_", "maxvit_")):
        return 224
    return max(size, 128) if name == "inception_v3" else size


def coverage_cost(tv, name: str, size: int) -> float:
    """Sort key, cheap first: GMACs at the input size used plus parameters (M) / 20, both from the
    weights' metadata (nothing is built or downloaded)."""
    meta = tv.models.get_model_weights(name).DEFAULT.meta
    side = coverage_size(name, size)
    return meta["_ops"] * (side / 224) ** 2 + meta["num_params"] / 20e6


def _vm(key: str, pid: str = "self") -> float:
    """VmRSS / VmHWM of a process in GiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def coverage_child(spec: dict) -> None:
    """One model × tool, all targets; results written to ``spec['result']`` after every step."""
    import traceback

    from benchmarks.tv_shim import import_torchvision

    torch.set_num_threads(spec["threads"])
    res_path = Path(spec["result"])
    res: dict = {"targets": {}}

    def save():
        res_path.write_text(json.dumps(res, indent=1))

    tv = import_torchvision()
    if spec["tool"] == "tp":  # imports are not pruning time
        import torch_pruning  # noqa: F401
    else:
        import mipprune.pruning.channel_graph  # noqa: F401
        import mipprune.pruning.group_budget  # noqa: F401
        import mipprune.pruning.group_surgery  # noqa: F401
        import mipprune.pruning.selector  # noqa: F401
    t0 = time.perf_counter()
    model = tv.models.get_model(spec["model"]).eval()
    x = torch.randn(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    base_p, base_f = _count(model, x)
    res.update(build_time=time.perf_counter() - t0, params=base_p, flops=base_f, base_rss_gib=_vm("VmRSS"))
    save()
    for t in spec["targets"]:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is this target's
        res["targets"][str(t)] = {"started": True}
        save()
        try:
            if spec["tool"] == "tp":
                r = tp_flops(model, x, t)
            elif spec["tool"] == "ours":
                r = ours_flops(model, x, t)
            else:
                r = lasso_run(model, spec["size"], spec["images"], t, Path(spec["log"]))
            pruned = r.pop("pruned", None)
            if pruned is not None:
                with torch.no_grad():
                    y = pruned(x)
                p, f = _count(pruned, x)
                r.update(ok=tuple(y.shape) == (1, 1000), params_ratio=p / base_p, flops_ratio=f / base_f)
                del pruned
            else:  # lasso: the selector's own exact count of the kept FLOPs
                r.update(ok=r.get("achieved_ratio") is not None, flops_ratio=r.get("achieved_ratio"))
            if r.get("flops_ratio") is not None:
                r["in_window"] = bool(0.995 * t <= r["flops_ratio"] <= t)
        except Exception as exc:  # a tool failing on a model is a result
            r = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                 "traceback": traceback.format_exc()[-2500:]}
        r["peak_rss_gib"] = _vm("VmHWM")
        res["targets"][str(t)] = r
        save()  # (tp_flops deep-copies per try; ours and lasso leave the model untouched, so no copy here)


def _run_child(spec: dict, timeout: float, mem_cap_gib: float, log: Path) -> dict:
    """Run :func:`coverage_child` in a subprocess; returns its results plus status, wall time and the
    child's peak RSS (kernel accounting, also when it was killed)."""
    import os
    import signal
    import subprocess
    import sys

    res_path = Path(spec["result"])
    res_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--coverage-child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    with log.open("w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        status, killed = None, None
        try:
            while True:
                pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    status = st
                    break
                if time.perf_counter() - t0 > timeout:
                    killed = "time limit"
                elif _vm("VmRSS", str(proc.pid)) > mem_cap_gib:
                    killed = "memory cap"
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.25)
        except BaseException:  # the benchmark stopped (Ctrl-C, SIGTERM): take the child along
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    try:
        res = json.loads(res_path.read_text())
    except (OSError, ValueError):
        res = {"targets": {}}
    res.update(wall=time.perf_counter() - t0, child_peak_rss_gib=ru.ru_maxrss / 2**20)
    code = proc.returncode
    res["status"] = killed or ("ok" if code == 0 else f"crash (signal {-code})" if code < 0 else f"exit {code}")
    if res["status"] != "ok":  # targets not finished get the status as their error
        for t in spec["targets"]:
            r = res["targets"].get(str(t))
            if r is None or "ok" not in r:
                res["targets"][str(t)] = {"ok": False, "error": res["status"], "peak_rss_gib": ru.ru_maxrss / 2**20,
                                          "time": None}
    return res


def coverage_table(rows: dict, names: list[str], targets: list[float]) -> tuple[list[str], str]:
    """Markdown table (one line per model × target) and the summary line."""
    def cell(r):
        if r is None:
            return "—", "—", "—", "—"
        if not r.get("ok"):
            err = r.get("error", "?").split(":")[0][:28]
            return "fail: " + err, "", "" if r.get("time") is None else f"{r['time']:.1f}", \
                f"{r.get('peak_rss_gib') or 0:.2f}"
        fr = r.get("flops_ratio")
        mark = "" if r.get("in_window") else " ✗"
        return (f"{fr:.4f}{mark}" if fr is not None else "?", str(r.get("groups", "")),
                f"{r['time']:.1f}" + (f" ({r['tries']})" if "tries" in r else ""), f"{r.get('peak_rss_gib', 0):.2f}")

    lines = ["| model | size | t | TP FLOPs | TP groups | TP s (tries) | TP GiB | ours FLOPs | ours groups | ours s "
             "| ours GiB | ours/TP s | lasso FLOPs | lasso s | lasso GiB |", "|" + "---|" * 15]
    tp_ok, ours_ok, ours_only, tp_only, lasso_ok, ratios, per_try = set(), set(), set(), set(), set(), [], []
    in_win = {"tp": 0, "ours": 0, "lasso": 0}
    n_rows = {"tp": 0, "ours": 0, "lasso": 0}
    for name in names:
        entry = {tool: rows.get(f"{name}|{tool}") for tool in COVERAGE_TOOLS}
        if not any(entry.values()):
            continue
        for t in targets:
            got = {tool: (e or {}).get("targets", {}).get(str(t)) for tool, e in entry.items()}
            for tool, r in got.items():
                if r is not None:
                    n_rows[tool] += 1
                    in_win[tool] += bool(r.get("ok") and r.get("in_window"))
            tp, us, la = cell(got["tp"]), cell(got["ours"]), cell(got["lasso"])
            ratio = ""
            if (got["tp"] or {}).get("ok") and (got["ours"] or {}).get("ok"):
                q = got["ours"]["time"] / got["tp"]["time"]
                ratios.append(q)
                per_try.append(got["ours"]["time"] * got["tp"]["tries"] / got["tp"]["time"])
                ratio = f"{q:.2f}"
            size = (entry["tp"] or entry["ours"] or entry["lasso"])["size"]
            lines.append(f"| {name} | {size} | {t:g} | {tp[0]} | {tp[1]} | {tp[2]} | {tp[3]} | {us[0]} | {us[1]} | "
                         f"{us[2]} | {us[3]} | {ratio} | {la[0]} | {la[2]} | {la[3]} |")
        for tool, ok_set in (("tp", tp_ok), ("ours", ours_ok), ("lasso", lasso_ok)):
            e = entry[tool]
            if e and all((e["targets"].get(str(t)) or {}).get("ok") for t in e["spec_targets"]):
                ok_set.add(name)
        if name in ours_ok and entry["tp"] and name not in tp_ok:
            ours_only.add(name)
        if name in tp_ok and entry["ours"] and name not in ours_ok:
            tp_only.add(name)
    tried = {tool: sum(bool(rows.get(f"{n}|{tool}")) for n in names) for tool in COVERAGE_TOOLS}
    med = float(np.median(ratios)) if ratios else float("nan")
    summary = (f"TP runs on {len(tp_ok)}/{tried['tp']} models, ours (magnitude) on {len(ours_ok)}/{tried['ours']}, "
               f"ours and not TP: {len(ours_only)}, TP and not ours: "
               f"{len(tp_only)}; lasso on {len(lasso_ok)}/{tried['lasso']}; FLOPs in [0.995 t, t]: "
               f"TP {in_win['tp']}/{n_rows['tp']}, ours {in_win['ours']}/{n_rows['ours']}, "
               f"lasso {in_win['lasso']}/{n_rows['lasso']} (model × target); ours/TP time: median {med:.2f}, "
               f"max {max(ratios) if ratios else float('nan'):.2f} over {len(ratios)} (against one TP try: median "
               f"{float(np.median(per_try)) if per_try else float('nan'):.2f}, max "
               f"{max(per_try) if per_try else float('nan'):.2f})")
    return lines, summary


def coverage(args, tv) -> None:
    """Run (resumably) every model × tool not yet done with the same settings, cheap models first,
    within ``--time-box`` seconds; rewrite the JSON after every run; print the table and summary."""
    import signal
    import sys

    out = Path(__file__).parent / "out"
    logs = out / "zoo_coverage_logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = out / "bench_zoo_coverage.json"
    every = args.models in ("all", ",".join(MODELS))  # coverage's default is the whole zoo
    names = tv.models.list_models(module=tv.models) if every else args.models.split(",")
    names = sorted(names, key=lambda n: coverage_cost(tv, n, args.size))
    targets = [float(t) for t in (args.targets or "0.5,0.25").split(",")]
    state = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    rows = state["rows"]
    tools = args.tools.split(",")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed benchmark kills its child too
    t_start = time.perf_counter()
    # magnitude columns model by model (a time box then leaves whole rows), the costly lasso column after
    plan = [(name, tool) for name in names for tool in tools if tool != "lasso"]
    plan += [(name, "lasso") for name in names if "lasso" in tools]
    for name, tool in plan:
        tool_targets = [float(t) for t in args.lasso_targets.split(",")] if tool == "lasso" else targets
        size = coverage_size(name, args.size)
        spec = {"model": name, "tool": tool, "size": size, "targets": tool_targets, "threads": args.threads,
                "images": args.images if tool == "lasso" else None}
        settings = dict(spec, timeout=args.timeout, mem_cap_gib=args.mem_cap)
        key = f"{name}|{tool}"
        old = rows.get(key)
        if old and old.get("settings") == settings and not (args.retry_errors and old["status"] != "ok"
                                                             and old["status"] not in ("time limit", "memory cap")):
            continue
        left = args.time_box - (time.perf_counter() - t_start)
        if left < 30:
            print(f"time box ({args.time_box:.0f} s) reached: {key} and the rest not run", flush=True)
            break
        timeout = min(args.timeout, left)
        spec.update(result=str(logs / f"{name}_{tool}.result.json"), log=str(logs / f"{name}_{tool}.lasso.log"))
        r = _run_child(spec, timeout, args.mem_cap, logs / f"{name}_{tool}.log")
        if r["status"] == "time limit" and timeout < args.timeout:
            print(f"{key}: stopped by the time box after {r['wall']:.0f} s (not recorded)", flush=True)
            break
        r.update(settings=settings, size=size, spec_targets=tool_targets,
                 date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        rows[key] = r
        summary = "; ".join(
            f"{t}: " + (f"{v['flops_ratio']:.4f} in {v['time']:.1f} s, {v['peak_rss_gib']:.2f} GiB"
                        if v.get("ok") else str(v.get("error"))[:80])
            for t, v in r["targets"].items())
        print(f"[{time.perf_counter() - t_start:6.0f} s] {name:22s} {tool:5s} {r['status']:10s} "
              f"wall {r['wall']:.0f} s, child peak {r['child_peak_rss_gib']:.2f} GiB | {summary}", flush=True)
        state.update(meta={"machine": platform.platform(), "torch": torch.__version__,
                           "torchvision": tv.__version__, "tools": COVERAGE_TOOLS,
                           "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        path.write_text(json.dumps(state, indent=1))
    lines, summary = coverage_table(rows, names, targets)
    print("\n".join(lines))
    print(summary)
    (out / "bench_zoo_coverage.md").write_text("\n".join(lines) + "\n\n" + summary + "\n")


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
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="--lasso: ChannelSelector's max_memory (statistics, activation cache, recorded "
                             "targets) in GiB; the process also holds torch, the model and the images")
    parser.add_argument("--lasso", type=int, default=None, metavar="N",
                        help="instead: ChannelSelector('lasso', flops=first target) on N random calibration images "
                             "per model, seconds and peak memory; writes bench_zoo_lasso_<model>_<size>.json")
    parser.add_argument("--coverage", action="store_true",
                        help="coverage mode: every model (--models all) × --tools in subprocesses with --timeout and "
                             "--mem-cap, resumable, within --time-box; writes bench_zoo_coverage.json/.md")
    parser.add_argument("--tools", default="tp,ours,lasso", help="coverage: tools, run column by column")
    parser.add_argument("--timeout", type=float, default=300, help="coverage: seconds per model × tool run")
    parser.add_argument("--mem-cap", type=float, default=6.0, help="coverage: GiB resident before a run is killed")
    parser.add_argument("--time-box", type=float, default=3600, help="coverage: seconds for the whole invocation")
    parser.add_argument("--images", type=int, default=256, help="coverage: lasso calibration images")
    parser.add_argument("--lasso-targets", default="0.5", help="coverage: FLOPs targets of the lasso column")
    parser.add_argument("--retry-errors", action="store_true",
                        help="coverage: rerun runs that failed with an error (not time limit / memory cap)")
    parser.add_argument("--coverage-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coverage_child:
        coverage_child(json.loads(args.coverage_child))
        return
    torch.set_num_threads(args.threads)
    tv = import_torchvision()
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "threads": args.threads, "input_size": args.size, "torch": torch.__version__}
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    targets = [float(t) for t in (args.targets or "0.5").split(",")]
    if args.coverage:
        coverage(args, tv)
        return
    if args.lasso:
        for name in args.models.split(","):
            torch.manual_seed(0)  # reproducible random init
            model = getattr(tv.models, name)(num_classes=10).eval()  # as issue 12's zoo: 10 classes, random init
            stem = f"bench_zoo_lasso_{name}_{args.size}_{args.lasso}" + (f"_mem{args.max_memory:g}" if args.max_memory else "")
            log = out / f"{stem}.log"
            log.write_text("")
            print(f"{name} {args.size}x{args.size}, lasso, flops={targets[0]}, {args.lasso} images "
                  f"(memory/progress log: {log})", flush=True)
            r = lasso_run(model, args.size, args.lasso, targets[0], log,
                          None if args.max_memory is None else int(args.max_memory * 2**30))
            print(f"{name:20s} lasso: {r['time']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, FLOPs "
                  f"{r['achieved_ratio']:.4f} (in window: {r['in_window']}), curves {r['curve_time']:.0f} s, "
                  f"captures {r['capture_time']:.0f} s, selections {r['select_time']:.0f} s, surgery "
                  f"{r['surgery_time']:.0f} s, CPU {r['cpu_time']:.0f} s, load average {r['load_average'][0]:.1f}",
                  flush=True)
            (out / f"{stem}.json").write_text(json.dumps(dict(meta, model=name, images=args.lasso, target=targets[0],
                                                               max_memory_gib=args.max_memory,
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
