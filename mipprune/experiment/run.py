"""The headline experiment: pruning speeds up adversarial-example MILPs.

Following Cacciola, Frangioni and Lodi (arXiv 2307.07457): train fully-connected ReLU networks,
prune each at several sparsities with several methods (structured channel selection with
reconstruction, and unstructured magnitude pruning of weights), and on test images pose the query
"is there an x in the L∞ / L1 ball whose predicted class differs?" (:meth:`solvers.Spec.robustness`)
as a MILP on the dense and on every pruned network, under a per-query time limit. Measured per
network: test accuracy, MILP size, bound time, solve time, verdicts and the speed-up over the dense
network on the same queries.

Following Pham et al. (arXiv 2505.01985), a pruned network is also used as a *surrogate*: the
counterexamples its MILP finds are re-checked on the dense network (float64 forward); a dense query
that timed out is settled (falsified, for the dense net) only when that re-check passes.

Pipeline: :func:`load_config` → :func:`run_experiment` (train → prune → export → queries on an
executor, appended one by one to ``queries.jsonl`` so runs resume → surrogate check → aggregation)
→ :mod:`mipprune.experiment.report` (tables, CSV/JSON, figures, report.md).

The torch imports live inside the functions that need them, so that pool workers (which import
only :mod:`mipprune.experiment.executors`) and config validation stay torch-free and fast.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from mipprune.experiment.aggregation import aggregate, headline, pair_queries, surrogate_search
from mipprune.experiment.config import ExperimentConfig
from mipprune.experiment.networks import prepare_networks
from mipprune.experiment.queries import ResultStore, build_jobs, export_suite, plan_queries, run_queries, select_images




# ============================================================================ the run
class _torch_threads:
    """Context: ``torch.set_num_threads(n)`` inside, the previous setting restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


@dataclass
class ExperimentResult:
    """Everything a run produced (``rows``: per query; ``aggregated``: per network)."""

    config: ExperimentConfig
    out: Path
    entries: list
    images: list
    queries: list
    rows: list
    pairs: list
    surrogate: list
    aggregated: list
    headline: dict | None
    n_run: int
    n_skipped: int
    wall_time: float
    files: dict = field(default_factory=dict)


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike = "runs/experiment", *, progress: bool = True,
                   console=None, report: bool = True) -> ExperimentResult:
    """Run (or resume) the experiment of ``cfg`` in folder ``out`` and write its reports there.

    Files: ``queries.jsonl`` (one row per finished query, appended as it finishes: the resume log),
    ``models/`` (cached torch models), ``onnx/`` + ``vnnlib/`` + ``instances.csv`` (VNN-COMP layout),
    ``results.csv``, ``results.json``, ``report.md`` and PNG figures.
    """
    from rich.console import Console

    t0 = time.perf_counter()
    console = console or Console(quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    with _torch_threads(1):   # tiny MLPs: threads only add sync stalls (and the pool owns the cores)
        entries, data = prepare_networks(cfg, out, log=lambda m: console.print(f"[dim]{m}[/]"))
    images = select_images(cfg, entries, data)
    from mipprune.experiment.executors import make_executor

    executor = make_executor(cfg.executor, cfg.jobs)   # one pool / Ray session for both phases
    try:
        queries = plan_queries(cfg, entries, data, images, out, executor=executor, console=console,
                               progress=progress)
        suite = export_suite(cfg, entries, data, queries, out)
        jobs = build_jobs(cfg, entries, data, queries)
        store = ResultStore(out / "queries.jsonl")
        n_run, n_skipped = run_queries(cfg, jobs, store, executor=executor, progress=progress, console=console)
    finally:
        executor.close()
    rows = [store.rows[j.key] for j in jobs]
    pairs = pair_queries(rows)
    surrogate = surrogate_search(cfg, rows, entries, data) if cfg.surrogate else []
    agg = aggregate(cfg, entries, rows, pairs, surrogate)
    res = ExperimentResult(cfg, out, entries, images, queries, rows, pairs, surrogate, agg,
                           headline(cfg, agg, surrogate), n_run, n_skipped, 0.0)
    res.wall_time = time.perf_counter() - t0
    if report:
        from mipprune.experiment import report as experiment_report

        res.files = experiment_report.write_all(res, data)
    if suite is not None:
        res.files["instances"] = suite
    return res


__all__ = ["ExperimentResult", "run_experiment"]
