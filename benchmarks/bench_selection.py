"""Channel selection: quality and time of every method, per layer and for whole networks, in one run.

Sections (one row per method; all in one table, JSON beside it):

* ``layer``  — each prunable layer of the default digits CNN (statistics captured once from the dense
  network, k = C/2): relative refit error, time, and the certified gap of ``exact``; the criteria
  (l1, bn_scale, hrank, mean_activation, similarity) score channels on the same calibration data
  and are refitted like every other method. ``× exact`` = error / exact's error (the baseline).
* ``synthetic`` — conv-like layers (3×3 taps per channel, correlated post-ReLU inputs) at
  C = 64, 128, 256, k = C/2, from the generator of ``benchmarks/bench_lasso.py`` (imported).
* ``digits`` — the whole digits CNN pruned to a FLOPs budget (50 %, 25 %, 10 % of the dense MACs)
  by ``ChannelSelector(method, flops=…)`` (widths from ``solvers.allocate_budget``; He et al.
  sequential calibration): test accuracy without and with ``--finetune`` epochs of KD fine-tuning,
  the end-to-end relative logit error on the test set, the achieved FLOPs ratio (``count_flops`` on
  the pruned model) and whether it lands in [0.995·target, target].
* ``teacher`` — a teacher–student task where channel choice matters: Gaussian inputs labelled by a
  random deep ReLU teacher MLP (16→32→32→4); a 4× wider student (16→128→128→4) trained on those labels
  is pruned back to the FLOPs budgets; accuracy (agreement with the teacher) without / with KD
  fine-tuning.

Checks printed at the end (and stored): exact gap ≤ 0.01 % at C = 64 and ≤ 1 % at C = 256 within the
``--time-limit`` / ``--time-limit-large`` used (defaults: the issue's 60 s and 300 s),
exact error ≤ LASSO error on every layer, FLOPs target hit within 0.5 % on every network run.

    python benchmarks/bench_selection.py [--quick] [--time-limit 60] [--time-limit-large 300]
        [--sizes 64 128 256] [--budgets 0.5 0.25 0.1] [--finetune 2] [--skip SECTION ...] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SOLVER_METHODS = ["exact", "swap", "greedy", "backward", "lasso", "magnitude", "random"]
CRITERIA = ["l1", "bn_scale", "hrank", "mean_activation", "similarity"]
NETWORK_METHODS = ["exact", "tecu", "swap", "greedy", "backward", "lasso", "magnitude", "random", "l1", "bn_scale", "hrank",
                   "mean_activation", "similarity"]
SECTIONS = ("layer", "synthetic", "digits", "teacher")


GENERATOR = "benchmarks/bench_lasso.py:synthetic_layer"   # the same conv-like layers as bench_lasso / bench_exact


# ------------------------------------------------------------------------------------------ helpers
def run_method(problem, k: int, method: str, time_limit: float, seed: int = 0):
    from solvers.selection.select import select_channels

    return select_channels(problem, k=k, method=method, time_limit=time_limit if method == "exact" else None,
                           seed=seed)


def run_criterion(problem, k: int, criterion: str, model, group, data):
    from mipprune.pruning.criteria import channel_scores
    from solvers.selection.baselines import select_by_scores

    start = time.perf_counter()
    scores = channel_scores(criterion, model, group, data, k=k)
    return select_by_scores(problem, scores, k, method=criterion, start=start)


def layer_rows(section: str, name: str, problem, k: int, methods, time_limit: float, extra=None) -> list[dict]:
    """One row per method on one selection problem; ``extra``: {criterion: callable() -> result}."""
    rows, results = [], {}
    for method in methods:
        t0 = time.perf_counter()
        try:
            res = extra[method]() if extra and method in extra else run_method(problem, k, method, time_limit)
        except Exception as exc:  # e.g. bn_scale without a BatchNorm: recorded, not fatal
            rows.append({"section": section, "problem": name, "method": method, "k": k, "C": problem.n_channels,
                         "error": None, "time": time.perf_counter() - t0, "gap": None, "bound": None,
                         "status": "n/a", "note": _short(exc)})
            continue
        results[method] = res
        rows.append({"section": section, "problem": name, "method": method, "k": k, "C": problem.n_channels,
                     "error": float(res.objective), "time": float(res.solve_time), "gap": res.gap,
                     "bound": res.bound, "status": str(res.status.value), "note": ""})
    ref = results.get("exact")
    for r in rows:  # a ratio of round-off-level errors (e.g. only dead channels dropped) means nothing
        r["vs_exact"] = (r["error"] / ref.objective if ref is not None and r["error"] is not None
                         and ref.objective > 1e-9 else None)
    return rows


def _short(exc: Exception) -> str:
    msg = str(exc)
    if "needs an affine BatchNorm" in msg:
        return "n/a: a pruned group has no BatchNorm"
    return f"{type(exc).__name__}: {msg}"[:120]


def end_to_end_error(model, dense, x) -> float:
    import torch

    with torch.no_grad():
        a, b = model.eval()(x).double(), dense.eval()(x).double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def network_rows(section: str, dense, calib, train, test, input_shape, budgets, methods, args) -> list[dict]:
    from mipprune.pruning.selector import ChannelSelector
    from mipprune.train import count_flops, evaluate, finetune

    rows = []
    dense_flops = count_flops(dense, input_shape)
    x_test = test[0]
    acc_dense = evaluate(dense, test)
    rows.append({"section": section, "problem": "dense", "method": "-", "budget": 1.0, "accuracy": acc_dense,
                 "accuracy_kd": None, "flops_ratio": 1.0, "in_window": True, "time": 0.0, "error": 0.0})
    for budget in budgets:
        for method in methods:
            t0 = time.perf_counter()
            row = {"section": section, "problem": f"FLOPs {budget:.0%}", "method": method, "budget": budget}
            try:
                sel = ChannelSelector(method, flops=budget, positions=args.positions, seed=args.seed,
                                      time_limit=args.net_time_limit, max_iter=args.tecu_iter,
                                      exact_max_channels=args.tecu_exact_max)
                sel.fit(dense, calib)
            except Exception as exc:
                row.update(accuracy=None, accuracy_kd=None, flops_ratio=None, in_window=None, error=None,
                           time=time.perf_counter() - t0, note=_short(exc))
                rows.append(row)
                continue
            fit_time = time.perf_counter() - t0
            pruned = sel.prune(dense)
            ratio = count_flops(pruned, input_shape) / dense_flops
            acc = evaluate(pruned, test)
            acc_kd = None
            if args.finetune > 0:
                tuned = finetune(pruned, dense, train, epochs=args.finetune, lr=1e-3, seed=args.seed)
                acc_kd = evaluate(tuned, test)
            gaps = [r["gap"] for r in sel.report_rows() if r["gap"] is not None]
            row.update(accuracy=acc, accuracy_kd=acc_kd, flops_ratio=ratio,
                       in_window=bool(0.995 * budget - 1e-12 <= ratio <= budget + 1e-12),
                       error=end_to_end_error(pruned, dense, x_test), time=fit_time,
                       gap=max(gaps) if gaps else None, widths=sel.budget_["widths"],
                       allocation=sel.budget_["allocation"],
                       tecu=[h["objective"] for h in sel.tecu_history_] if sel.tecu_history_ else None, note="")
            rows.append(row)
    for r in rows:  # end-to-end error relative to exact's at the same budget (the baseline)
        ref = next((q for q in rows if q["problem"] == r["problem"] and q["method"] == "exact"), None)
        r["vs_exact"] = (r["error"] / ref["error"] if ref is not None and ref.get("error") and r.get("error")
                         is not None and r["method"] != "-" else None)
    return rows


def teacher_student(seed: int, n_train: int, n_test: int, epochs: int):
    """Gaussian inputs (16-d) labelled by a random deep ReLU teacher 16→32→32→4 (He-initialised; each
    logit standardised over the data before the argmax, so the 4 classes are roughly balanced); a
    wider student 16→128→128→4 trained on those labels. Returns (student, train, test) tensors."""
    import torch
    from torch import nn

    from mipprune.data import make_loader
    from mipprune.models import mlp
    from mipprune.train import train_classifier

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = mlp((16, 32, 32, 4))
        for m in teacher.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, std=0.1)
        student = mlp((16, 128, 128, 4))
    x = torch.randn(n_train + n_test, 16, generator=g)
    with torch.no_grad():
        z = teacher(x)
        y = ((z - z.mean(dim=0)) / z.std(dim=0)).argmax(dim=1)
    train = (x[:n_train], y[:n_train])
    test = (x[n_train:], y[n_train:])
    train_classifier(student, make_loader(*train, batch_size=128, shuffle=True, seed=seed), epochs=epochs,
                     lr=3e-3, seed=seed)
    return student, train, test


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="shrink: C = 64 only, budgets 0.5 and 0.25, fewer network methods, 5 s limits")
    ap.add_argument("--time-limit", type=float, default=60.0, help="exact: seconds per layer / synthetic C < 256 (the issue: 60)")
    ap.add_argument("--time-limit-large", type=float, default=300.0, help="exact: seconds at synthetic C >= 256 (the issue: 300)")
    ap.add_argument("--net-time-limit", type=float, default=3.0,
                    help="exact / TECU: seconds per layer selection inside whole-network runs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="synthetic C (k = C/2)")
    ap.add_argument("--n", type=int, default=4000, help="synthetic rows of Z")
    ap.add_argument("--m", type=int, default=64, help="synthetic output channels")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="FLOPs fractions kept")
    ap.add_argument("--finetune", type=int, default=2, help="KD fine-tuning epochs (0: none)")
    ap.add_argument("--methods", nargs="+", default=None, help="whole-network methods (default: all)")
    ap.add_argument("--tecu-iter", type=int, default=2, help="TECU outer iterations")
    ap.add_argument("--tecu-exact-max", type=int, default=16,
                    help="TECU: blocks of at most this many channels use exact, larger ones greedy + swaps")
    ap.add_argument("--positions", type=int, default=10, help="conv positions sampled per image")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the digits CNN")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (1: stable on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bench_selection.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = [64]
        args.budgets = [0.5, 0.25]
        args.time_limit = min(args.time_limit, 5.0)
        args.time_limit_large = min(args.time_limit_large, 5.0)
        args.methods = args.methods or ["exact", "tecu", "greedy", "lasso", "magnitude", "random", "l1", "hrank"]
    methods = args.methods or NETWORK_METHODS

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from rich.console import Console
    from rich.table import Table
    from threadpoolctl import threadpool_limits

    from mipprune.pruning.bridge import capture
    from mipprune.data import make_loader
    from mipprune.pruning.graph import find_prune_groups
    from mipprune.train import train_digits_cnn
    from solvers.selection.problem import SelectionProblem

    warnings.filterwarnings("ignore", message="Solution may be inaccurate")
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    t_all = time.perf_counter()
    rows: list[dict] = []
    from bench_lasso import synthetic_layer

    with threadpool_limits(limits=args.threads):
        need_digits = {"layer", "digits"} - set(args.skip)
        if need_digits:
            console.print("training the digits CNN …")
            model, data = train_digits_cnn(seed=args.seed, epochs=args.epochs)
            calib = make_loader(data.x_train, batch_size=256)
            train = make_loader(data.x_train, data.y_train, batch_size=64, shuffle=True, seed=args.seed)
            test = (data.x_test, data.y_test)
        if "layer" not in args.skip:
            console.print("per-layer selection on the digits CNN …")
            groups = find_prune_groups(model, data.x_train[:1])
            stats = capture(model, calib, [g.consumer for g in groups], positions=args.positions, seed=args.seed,
                            columns_per_channel={g.consumer: g.columns_per_channel for g in groups})
            for g in groups:
                problem = stats[g.consumer].problem()
                k = g.n_channels // 2
                extra = {c: (lambda c=c, g=g, p=problem, k=k: run_criterion(p, k, c, model, g, calib))
                         for c in CRITERIA}
                rows += layer_rows("layer", f"digits {g.producer}→{g.consumer} ({problem.n_columns} cols)", problem,
                                   k, SOLVER_METHODS + CRITERIA, args.time_limit, extra)
        if "synthetic" not in args.skip:
            for C in args.sizes:
                console.print(f"synthetic layer C={C} …")
                Z, W, Y, grp = synthetic_layer(C, args.m, max(args.n, 12 * C), args.seed, cols=9)
                problem = SelectionProblem.from_data(Z, Y, grp, weights=W)
                del Z, Y
                limit = args.time_limit_large if C >= 256 else args.time_limit
                rows += layer_rows("synthetic", f"C={C} (9 cols/ch, m={args.m})", problem, C // 2, SOLVER_METHODS,
                                   limit)
        if "digits" not in args.skip:
            console.print(f"whole digits CNN at FLOPs budgets {args.budgets} …")
            rows += network_rows("digits", model, calib, train, test, (1, 8, 8), args.budgets, methods, args)
        if "teacher" not in args.skip:
            console.print("teacher–student task …")
            student, tr, te = teacher_student(args.seed, n_train=8000, n_test=3000, epochs=20)
            rows += network_rows("teacher", student, make_loader(tr[0][:4000], batch_size=500),
                                 make_loader(*tr, batch_size=128, shuffle=True, seed=args.seed), te, (16,),
                                 args.budgets, [m for m in methods if m != "bn_scale"], args)
    total = time.perf_counter() - t_all

    # ---- checks (the targets)
    def gap_at(C):
        r = next((r for r in rows if r["section"] == "synthetic" and r["method"] == "exact" and r["C"] == C), None)
        return None if r is None else r["gap"]

    checks = []
    for C, target in ((64, 1e-4), (256, 1e-2), (512, 5e-2)):
        g = gap_at(C)
        if g is not None:
            limit = args.time_limit_large if C >= 256 else args.time_limit
            checks.append({"check": f"exact gap at C={C} <= {target:.2%} within {limit:g} s", "value": g,
                           "pass": bool(g <= target)})
    per_layer = {}
    for r in rows:
        if r["section"] in ("layer", "synthetic") and r["method"] in ("exact", "lasso") and r["error"] is not None:
            per_layer.setdefault((r["section"], r["problem"]), {})[r["method"]] = r["error"]
    worse = [p for p, v in per_layer.items() if len(v) == 2 and v["exact"] > v["lasso"] * (1 + 1e-9) + 1e-15]
    if per_layer:
        checks.append({"check": "exact error <= LASSO error on every layer", "value": f"{len(worse)} worse",
                       "pass": not worse, "worse": [list(p) for p in worse]})
    net_exact = [r for r in rows if r["section"] in ("digits", "teacher") and r["method"] == "exact"
                 and r.get("gap") is not None]
    if net_exact:   # issue 15: the worst group's proven gap in whole-network runs <= 10 %
        worst = max(r["gap"] for r in net_exact)
        checks.append({"check": f"worst layer gap of exact in whole-network runs <= 10% "
                                f"({args.net_time_limit:g} s per layer)", "value": worst, "pass": bool(worst <= 0.10)})
    swap_rows = [(r, next((q for q in rows if q["section"] == r["section"] and q["problem"] == r["problem"]
                           and q["method"] == "backward"), None)) for r in rows if r["method"] == "swap"]
    swap_rows = [(a, b) for a, b in swap_rows if b is not None and a.get("error") is not None and b.get("error") is not None]
    if swap_rows:
        worse = [f"{a['section']}/{a['problem']}" for a, b in swap_rows
                 if a["section"] in ("layer", "synthetic") and a["error"] > b["error"] * (1 + 1e-9) + 1e-15]
        checks.append({"check": "swap error <= backward error on every layer", "value": f"{len(worse)} worse",
                       "pass": not worse, "worse": worse})
    net = [r for r in rows if r["section"] in ("digits", "teacher") and r["method"] != "-" and r.get("flops_ratio")]
    if net:
        miss = [f"{r['section']}/{r['problem']}/{r['method']}" for r in net if not r["in_window"]]
        checks.append({"check": "FLOPs ratio in [0.995·target, target] on every network run",
                       "value": f"{len(net) - len(miss)}/{len(net)}", "pass": not miss, "missed": miss})

    # ---- one table
    table = Table(title=f"Channel selection: {len(rows)} runs, {args.threads} thread(s), exact limit "
                        f"{args.time_limit:g}/{args.time_limit_large:g} s per layer, {total:.0f} s in all")
    for col, just in [("section", "left"), ("problem", "left"), ("method", "left"), ("k/C", "right"),
                      ("rel. error", "right"), ("× exact", "right"), ("gap", "right"), ("time s", "right"),
                      ("acc.", "right"), (f"acc. +KD{args.finetune}", "right"), ("FLOPs kept", "right"),
                      ("note", "left")]:
        table.add_column(col, justify=just, no_wrap=col != "note", max_width=40 if col == "note" else None)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    prev = None
    for r in rows:
        key = (r["section"], r["problem"])
        if prev is not None and key != prev:
            table.add_section()
        prev = key
        is_net = r["section"] in ("digits", "teacher")
        table.add_row(
            r["section"], r["problem"], r["method"],
            "" if is_net else f"{r['k']}/{r['C']}",
            f(r.get("error"), ".3e"), f(r.get("vs_exact"), ".3f"),
            "-" if r.get("gap") is None else f"{100 * r['gap']:.3g}%", f(r.get("time"), ".2f"),
            f(r.get("accuracy"), ".4f"), f(r.get("accuracy_kd"), ".4f"),
            "" if not is_net else ("-" if r.get("flops_ratio") is None else
                                   f"{r['flops_ratio']:.4f}{'' if r['in_window'] else ' MISS'}"),
            r.get("note") or "")
    table.caption = ("rel. error: layer rows ‖Y − Ŷ‖²/‖Y‖² after refit (calibration data); network rows the "
                     "end-to-end ‖f − f_dense‖²/‖f_dense‖² on the test set. × exact: error / exact's (same problem or "
                     "budget). "
                     "gap: proven "
                     "(exact; network rows: worst layer). acc.: test accuracy (teacher: agreement with the teacher).")
    console.print(table)
    for c in checks:
        console.print(f"[{'green' if c['pass'] else 'red'}]{'PASS' if c['pass'] else 'FAIL'}[/] {c['check']}: "
                      f"{c['value'] if not isinstance(c['value'], float) else format(c['value'], '.3g')}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "selection", "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": args.threads, "generator": GENERATOR, "total_s": total,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checks": checks, "rows": rows}, indent=2, default=float))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
