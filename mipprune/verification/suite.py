"""Run a VNN-COMP style benchmark folder: ``instances.csv`` (onnx, vnnlib, timeout) → one row per instance.

Torch-free (pool workers import only this module and :mod:`solvers`). Instances run inline
(``jobs=1``) or in a ``ProcessPoolExecutor`` with the ``spawn`` start method (forking a process that
runs BLAS/OpenMP threads can deadlock). Results are appended to the CSV as each instance finishes.

When a ``ground_truth.csv`` (columns ``network, vnnlib, consensus, <tool>_verdict,
<tool>_time_s_raw``, as shipped with the shared benchmark) sits beside the instances, the summary
counts *wrong* verdicts (our sat/unsat against the opposite consensus; must be 0) and, on the same
instances, each competition tool's correct answers, wrong answers and median time. Competition
times were measured on other hardware: compare counts, read times as orders of magnitude.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from solvers.errors import InvalidInputError, MipPruneError
from solvers.result import Verdict, VerificationResult

__all__ = ["Instance", "InstanceResult", "instances_path", "read_instances", "read_ground_truth", "verify_instance",
           "verify_files", "run_instance", "run_suite", "summarize", "write_results_csv"]

WORDS = ("sat", "unsat", "timeout", "unknown", "error")


@dataclass(frozen=True)
class Instance:
    """One benchmark query: ONNX network, VNN-LIB property (absolute paths) and time limit (s)."""

    network: Path
    property: Path
    timeout: float


@dataclass
class InstanceResult:
    """One CSV row. ``verdict`` uses the VNN-COMP words (sat, unsat, timeout, unknown, error)."""

    network: str
    property: str
    timeout_s: float
    verdict: str
    time_s: float
    stage: str = "none"
    binaries: int = 0
    nodes: int = 0
    milp_vars: int = 0
    consensus: str = ""
    message: str = ""
    counterexample: list | None = field(default=None, repr=False)   # not written to the CSV

    @property
    def solved(self) -> bool:
        return self.verdict in ("sat", "unsat")

    @property
    def wrong(self) -> bool:
        """Disagrees with a sat/unsat consensus (sat vs unsat)."""
        return self.solved and self.consensus in ("sat", "unsat") and self.verdict != self.consensus


CSV_FIELDS = [f.name for f in fields(InstanceResult) if f.name != "counterexample"]


# ------------------------------------------------------------------------------ reading
def instances_path(bench_dir, instances: str | os.PathLike | None = None) -> Path:
    """The instances CSV: ``instances`` (absolute, relative to the working directory, or to
    ``bench_dir``), default ``bench_dir/instances.csv``."""
    bench = Path(bench_dir)
    if not bench.is_dir():
        raise InvalidInputError(f"benchmark folder must exist; got {str(bench)!r}")
    path = Path(instances) if instances is not None else bench / "instances.csv"
    if not path.is_absolute() and not path.exists():
        path = bench / path
    if not path.is_file():
        raise InvalidInputError(f"instances file must exist; got {str(path)!r}")
    return path


def _data_path(name: str, csv_path: Path, bench_dir) -> Path:
    """An instances CSV's file: absolute, relative to the CSV's folder, or (a subset CSV kept elsewhere,
    e.g. ``/tmp/hard.csv`` naming ``onnx/x.onnx``) relative to ``bench_dir``."""
    rel = Path(name.strip())
    own = (csv_path.parent / rel).resolve()
    if rel.is_absolute() or own.exists():
        return own
    bench = (Path(bench_dir) / rel).resolve()
    return bench if bench.exists() else own


def read_instances(bench_dir, instances: str | os.PathLike | None = None) -> list[Instance]:
    """Rows of the instances CSV: ``onnx, vnnlib, timeout``, the paths relative to the CSV's folder or,
    failing that, to ``bench_dir`` (see :func:`_data_path`)."""
    path = instances_path(bench_dir, instances)
    out = []
    with open(path, newline="") as fh:
        for k, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 3:
                raise InvalidInputError(f"{path.name} line {k}: expected 'onnx,vnnlib,timeout'; got {row}")
            try:
                timeout = float(row[2])
            except ValueError:
                raise InvalidInputError(f"{path.name} line {k}: timeout must be a number; got {row[2]!r}") from None
            out.append(Instance(_data_path(row[0], path, bench_dir), _data_path(row[1], path, bench_dir), timeout))
    if not out:
        raise InvalidInputError(f"{path.name} must list at least one instance; got none")
    return out


def read_ground_truth(path) -> dict[tuple[str, str], dict]:
    """``ground_truth.csv`` keyed by (network file name, property file name)."""
    with open(path, newline="") as fh:
        return {(r["network"], r["vnnlib"]): r for r in csv.DictReader(fh)}


def _tools(gt_rows) -> list[str]:
    if not gt_rows:
        return []
    cols = next(iter(gt_rows)).keys()
    return [c[: -len("_verdict")] for c in cols if c.endswith("_verdict")]


# ------------------------------------------------------------------------------ verifying
def verify_instance(network, specs, *, time_limit: float | None = None, backend: str = "highs",
                    **options) -> VerificationResult:
    """Verify a property given as several :class:`Spec` (a disjunction of input boxes).

    The property is violated iff some Spec is: the first FALSIFIED ends it; it holds iff every Spec
    is VERIFIED; otherwise TIMEOUT if any Spec timed out, else UNKNOWN. Specs share the time limit.
    """
    from mipprune.verification.verify import verify

    t0 = time.perf_counter()
    agg = {"milp_vars": 0, "milp_binaries": 0, "milp_nodes": 0}
    stage_times: dict[str, float] = {}
    results = []
    for spec in specs:
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            results.append(VerificationResult(Verdict.TIMEOUT, message="time limit hit before this input box"))
            break
        r = verify(network, spec, time_limit=left, backend=backend, **options)
        results.append(r)
        agg["milp_vars"] = max(agg["milp_vars"], r.milp_vars)
        agg["milp_binaries"] = max(agg["milp_binaries"], r.milp_binaries)
        agg["milp_nodes"] += r.milp_nodes
        for k, v in r.stage_times.items():
            stage_times[k] = stage_times.get(k, 0.0) + v
        if r.verdict is Verdict.FALSIFIED:
            break
    elapsed = time.perf_counter() - t0
    if len(results) == 1 and len(specs) == 1:
        return results[0]
    last = results[-1]
    if last.verdict is Verdict.FALSIFIED:
        verdict, decider = Verdict.FALSIFIED, last
    elif len(results) == len(specs) and all(r.verdict is Verdict.VERIFIED for r in results):
        verdict, decider = Verdict.VERIFIED, max(results, key=lambda r: r.time)
    else:
        verdict = Verdict.TIMEOUT if any(r.verdict is Verdict.TIMEOUT for r in results) else Verdict.UNKNOWN
        decider = next(r for r in results if r.verdict is not Verdict.VERIFIED)
    msg = f"{len(results)}/{len(specs)} input boxes checked; " + decider.message
    return VerificationResult(verdict, counterexample=decider.counterexample if verdict is Verdict.FALSIFIED else None,
                              output=decider.output if verdict is Verdict.FALSIFIED else None, time=elapsed,
                              stage=decider.stage if verdict is not Verdict.TIMEOUT else "none",
                              stage_times=stage_times, message=msg, **agg)


def verify_files(onnx_path, vnnlib_path, *, time_limit: float | None = None, backend: str = "highs",
                 **options) -> tuple[VerificationResult, float]:
    """Load ``onnx_path`` and ``vnnlib_path`` and verify; returns (result, load seconds).

    The load time counts against ``time_limit`` (as in VNN-COMP).
    """
    from solvers.network.ir import Network
    from solvers.network.vnnlib import load_vnnlib

    t0 = time.perf_counter()
    net = Network.from_onnx(onnx_path)
    specs = load_vnnlib(vnnlib_path, net.n_inputs, net.n_outputs)
    load = time.perf_counter() - t0
    left = None if time_limit is None else max(time_limit - load, 1e-3)
    return verify_instance(net, specs, time_limit=left, backend=backend, **options), load


def run_instance(inst: Instance, timeout: float, backend: str = "highs", consensus: str = "",
                 options: dict | None = None) -> InstanceResult:
    """Run one instance; project errors become an ``error`` row instead of stopping the suite."""
    from solvers.network.vnnlib import result_word

    t0 = time.perf_counter()
    base = dict(network=inst.network.name, property=inst.property.name, timeout_s=timeout, consensus=consensus)
    try:
        res, _ = verify_files(inst.network, inst.property, time_limit=timeout, backend=backend, **(options or {}))
    except MipPruneError as exc:
        return InstanceResult(verdict="error", time_s=time.perf_counter() - t0, message=str(exc), **base)
    cx = None if res.counterexample is None else [float(v) for v in res.counterexample]
    return InstanceResult(verdict=result_word(res.verdict), time_s=time.perf_counter() - t0, stage=res.stage,
                          binaries=res.milp_binaries, nodes=res.milp_nodes, milp_vars=res.milp_vars,
                          message=res.message, counterexample=cx, **base)


def _limit_threads() -> None:
    # pool workers: one BLAS thread each, the pool provides the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - optional
        pass
    _warm_up()


def _warm_up() -> None:
    """Pay a fresh process's one-off costs (imports of torch, HiGHS and the ONNX reader, the first
    autograd pass, the first LP and MILP) before any instance's clock starts. Under load a worker's
    first ``import torch`` alone took 15 s on the shared 2-core machine (two workers starting beside
    other jobs) and pushed its instance to 26 s under a 10 s limit."""
    import numpy as np
    import torch

    import solvers.network.onnx  # noqa: F401
    import solvers.network.vnnlib  # noqa: F401
    from mipprune.verification import crown
    from mipprune.verification.attack import pgd_attack
    from mipprune.verification.bounds import compute_bounds
    from solvers.milp import build_milp, solve_highs
    from solvers.network.ir import Network
    from solvers.network.layers import Dense, ReLU
    from solvers.network.spec import Spec

    rng = np.random.default_rng(0)
    net = Network([Dense(rng.normal(size=(4, 2))), ReLU(), Dense(rng.normal(size=(2, 4)))], (2,))
    lo, hi = -np.ones(2), np.ones(2)
    b = compute_bounds(net, lo, hi, "lp")                                   # HiGHS LP
    solve_highs(build_milp(net, b.lower, b.upper, lower=lo, upper=hi).with_objective(np.ones(2)), time_limit=5)
    pgd_attack(net, Spec(lo, hi, ((np.ones((1, 2)), np.zeros(1)),)), restarts=1, steps=2)
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    L, U = tn.box(lo, hi)
    lower, upper = crown.crown_intermediate(tn, L, U)
    crown.optimize_bound(tn, lower, upper, torch.ones(1, 1, 2, dtype=tn.dtype), torch.zeros(1, 1, dtype=tn.dtype),
                         L, U, iters=2)                                    # the first autograd pass


def run_suite(bench_dir, *, instances=None, jobs: int = 1, filter: str | None = None, network: str | None = None,
              timeout_scale: float = 1.0, max_timeout: float | None = None, timeout: float | None = None,
              backend: str = "highs",
              options: dict | None = None, ground_truth: str | os.PathLike | None = None,
              out_csv: str | os.PathLike | None = None,
              on_start: Callable[[int], None] | None = None,
              on_result: Callable[[InstanceResult], None] | None = None) -> list[InstanceResult]:
    """Run the instances of ``bench_dir`` (optionally only those whose ``network/property`` contains
    ``filter`` and whose network file name contains ``network``) with time limits
    ``min(t · timeout_scale, max_timeout)`` seconds, ``t`` the instance's own limit, or ``timeout``
    (seconds) for every instance when given.

    ``ground_truth`` defaults to ``ground_truth.csv`` beside the instances file when present; its
    consensus is copied into each row. ``out_csv`` receives one row per instance as it finishes.
    ``on_start(n)`` is called with the number of selected instances, ``on_result(row)`` per row.
    Returns the rows in the order of the instances file.
    """
    if jobs < 1:
        raise InvalidInputError(f"jobs must be >= 1; got {jobs}")
    if not timeout_scale > 0:
        raise InvalidInputError(f"timeout_scale must be > 0; got {timeout_scale}")
    if max_timeout is not None and not max_timeout > 0:
        raise InvalidInputError(f"max_timeout must be > 0 seconds; got {max_timeout}")
    if timeout is not None and not timeout > 0:
        raise InvalidInputError(f"timeout must be > 0 seconds; got {timeout}")
    insts = read_instances(bench_dir, instances)
    if network:
        insts = [i for i in insts if network in i.network.name]
        if not insts:
            raise InvalidInputError(f"network {network!r} must match at least one instance's network; got none")
    if filter:
        insts = [i for i in insts if filter in f"{i.network.name}/{i.property.name}"]
        if not insts:
            raise InvalidInputError(f"filter {filter!r} must match at least one instance; got none")
    gt_path = (Path(ground_truth) if ground_truth is not None
               else instances_path(bench_dir, instances).parent / "ground_truth.csv")
    if ground_truth is not None and not gt_path.is_file():
        raise InvalidInputError(f"ground truth file must exist; got {str(gt_path)!r}")
    gt = read_ground_truth(gt_path) if gt_path.is_file() else {}

    def limit(i: Instance) -> float:
        t = (i.timeout if timeout is None else timeout) * timeout_scale
        return t if max_timeout is None else min(t, max_timeout)

    def cons(i: Instance) -> str:
        return gt.get((i.network.name, i.property.name), {}).get("consensus", "")

    if on_start:
        on_start(len(insts))
    writer_fh = None
    writer = None
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        writer_fh = open(out_csv, "w", newline="")
        writer = csv.DictWriter(writer_fh, fieldnames=CSV_FIELDS)
        writer.writeheader()

    def record(row: InstanceResult) -> None:
        if writer is not None:
            writer.writerow({k: v for k, v in asdict(row).items() if k in CSV_FIELDS})
            writer_fh.flush()
        if on_result:
            on_result(row)

    results: dict[int, InstanceResult] = {}
    try:
        if jobs == 1:
            for k, i in enumerate(insts):
                results[k] = run_instance(i, limit(i), backend, cons(i), options)
                record(results[k])
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_limit_threads) as pool:
                futs = {pool.submit(run_instance, i, limit(i), backend, cons(i), options): k
                        for k, i in enumerate(insts)}
                for f in as_completed(futs):
                    results[futs[f]] = f.result()
                    record(results[futs[f]])
    finally:
        if writer_fh is not None:
            writer_fh.close()
    return [results[k] for k in sorted(results)]


# ------------------------------------------------------------------------------ summary
def _median(xs) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: list[InstanceResult], ground_truth: dict | None = None) -> dict:
    """Counts and times of ``results``; with ``ground_truth`` also each tool's on the same instances.

    Returns a JSON-ready dict: ``ours`` {instances, sat, unsat, timeout, unknown, error, solved, wrong,
    median_time_s, mean_time_s (over solved)} and ``tools`` {name: {solved (correct answers), wrong,
    median_time_s (over correct answers)}}; a tool answer is wrong when it opposes a sat/unsat
    consensus (the one instance without consensus counts as solved but never wrong). A tool's answer
    counts only if its raw time is within the limit *we* ran that instance with (``timeout_s``), so
    capped runs (``--max-timeout``) are compared on equal terms.
    """
    counts = {w: sum(r.verdict == w for r in results) for w in WORDS}
    solved_t = [r.time_s for r in results if r.solved]
    ours = {"instances": len(results), **counts, "solved": counts["sat"] + counts["unsat"],
            "wrong": sum(r.wrong for r in results),
            "median_time_s": _median(solved_t), "mean_time_s": statistics.fmean(solved_t) if solved_t else None,
            "median_time_all_s": _median([r.time_s for r in results])}
    out = {"ours": ours, "tools": {}}
    if not ground_truth:
        return out
    pairs = [(r, ground_truth.get((r.network, r.property))) for r in results]
    pairs = [(r, g) for r, g in pairs if g is not None]
    out["with_ground_truth"] = len(pairs)
    for tool in _tools([g for _, g in pairs]):
        ok, wrong, times = 0, 0, []
        for r, g in pairs:
            v, c = g.get(f"{tool}_verdict", ""), g.get("consensus", "")
            try:
                t = float(g.get(f"{tool}_time_s_raw", "nan"))
            except ValueError:
                t = math.nan
            if v not in ("sat", "unsat") or (math.isfinite(t) and t > r.timeout_s):
                continue
            if c in ("sat", "unsat") and v != c:
                wrong += 1
                continue
            ok += 1
            if math.isfinite(t):
                times.append(t)
        out["tools"][tool] = {"solved": ok, "wrong": wrong, "median_time_s": _median(times)}
    return out


def write_results_csv(results: list[InstanceResult], path) -> None:
    """All rows at once (``run_suite(out_csv=…)`` already streams them)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow({k: v for k, v in asdict(r).items() if k in CSV_FIELDS})


def summary_table(summary: dict, title: str = "Verification suite"):
    """A rich Table: our counts and times, then each competition tool on the same instances, with
    the ratio of our solved count to the tool's."""
    from rich.table import Table

    def fmt(t):
        return "-" if t is None else f"{t:.2f}"

    o = summary["ours"]
    tab = Table(title=title)
    for col in ("solver", "solved", "sat", "unsat", "t/o", "other", "wrong", "med s", "mean s", "ours/tool"):
        tab.add_column(col, justify="left" if col == "solver" else "right", no_wrap=True)
    tab.add_row("[bold]mipprune[/]", str(o["solved"]), str(o["sat"]), str(o["unsat"]), str(o["timeout"]),
                str(o["unknown"] + o["error"]), f"[{'red' if o['wrong'] else 'green'}]{o['wrong']}[/]",
                fmt(o["median_time_s"]), fmt(o["mean_time_s"]), "")
    for name, t in sorted(summary.get("tools", {}).items(), key=lambda kv: (-kv[1]["solved"], kv[0])):
        ratio = f"{o['solved'] / t['solved']:.2f}" if t["solved"] else "-"
        tab.add_row(name, str(t["solved"]), "", "", "", "", str(t["wrong"]), fmt(t["median_time_s"]), "", ratio)
    return tab
