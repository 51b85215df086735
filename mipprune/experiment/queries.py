"""The experiment's queries: test images, calibrated radii, the robustness specs, their VNN-LIB
export, the verify jobs and the resumable result store (``queries.jsonl``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from solvers.errors import InvalidInputError
from mipprune.experiment.config import ExperimentConfig
from mipprune.experiment.networks import NetEntry, content_hash


def select_images(cfg: ExperimentConfig, entries: list[NetEntry], data) -> list[int]:
    """Indices of the first ``n_images`` test images that every dense net classifies correctly
    (so each query asks about a genuine prediction)."""
    x = data.x_test.reshape(len(data.x_test), -1).double().numpy()
    y = data.y_test.numpy()
    ok = np.ones(len(y), dtype=bool)
    for e in entries:
        if e.method == "dense":
            ok &= e.network.forward(x).argmax(axis=1) == y
    idx = np.flatnonzero(ok)[: cfg.n_images]
    if len(idx) < cfg.n_images:
        raise InvalidInputError(f"n_images must be <= {len(idx)} (test images all dense nets classify "
                                f"correctly); got {cfg.n_images}")
    return [int(i) for i in idx]


def make_spec(data, image: int, norm: str, eps: float):
    """The robustness query of test image ``image``: the flat image's ``norm`` ball of radius ``eps``
    ∩ [0, 1]; unsafe iff some other class's logit >= the true label's (one disjunct per class)."""
    from solvers.network.spec import Spec

    x = data.x_test[image].reshape(-1).double().numpy()
    label = int(data.y_test[image])
    return Spec.robustness(x, float(eps), label, 10, norm=norm, name=f"img{image}_{norm}_eps{eps:.6g}")


def attack_radius(network, center: np.ndarray, label: int, norm: str, *, seed: int = 0, iters: int = 10,
                  time_limit: float = 0.5) -> float:
    """Smallest radius (bisection: ``iters`` halvings of ``[0, cap]``) at which a short
    :func:`mipprune.verify` run (``time_limit`` seconds: CROWN minimizers, PGD, LP points, and whatever
    MILP fits) falsifies the robustness query of ``network`` around ``center``.

    ``cap`` = 1 for L∞ (the whole [0, 1] box) and ``n_inputs`` for L1; returns ``cap`` when even that
    is not falsified. An upper estimate of the minimal adversarial radius: below it, the cheap
    stages of ``verify`` do not settle the query by a counterexample.
    """
    from solvers.network.spec import Spec
    from mipprune.verification.verify import verify

    cap = 1.0 if norm == "linf" else float(center.size)

    def falsified(r: float) -> bool:
        spec = Spec.robustness(center, r, label, network.n_outputs, norm=norm)
        return verify(network, spec, time_limit=time_limit, seed=seed).verdict.value == "falsified"

    if not falsified(cap):
        return cap
    lo, hi = 0.0, cap
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if falsified(mid) else (mid, hi)
    return hi


def _write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file beside it, fsync'ed, then
    ``os.replace`` (a crash leaves the old file or the new one, never a torn one)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _calibrate(job: tuple) -> float:
    """Pool worker: ``attack_radius`` of one ``(network, center, label, norm, seed, time_limit)``."""
    network, center, label, norm, seed, time_limit = job
    return attack_radius(network, center, label, norm, seed=seed, time_limit=time_limit)


def plan_queries(cfg: ExperimentConfig, entries: list[NetEntry], data, images: list[int], out: Path, *,
                 executor=None, console=None, progress: bool = False) -> list[dict]:
    """One query per (architecture, image, norm): ``{"arch", "image", "norm", "label", "eps", "attack_radius"}``.

    With ``cfg.radius == "calibrated"``, ``eps = radius_fraction × attack_radius`` of the *dense* net of
    that architecture (:func:`attack_radius`: so its queries sit just inside the radius that quick
    attacks settle — the hard ones, which need the MILP). The calibrations run on the configured
    executor; radii are cached in ``out/radii.json`` keyed by the dense net's fingerprint, the cache
    rewritten (atomically) after each calibration, so an interrupted run keeps those already done
    and a restart computes only the missing ones.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mipprune.experiment.executors import make_executor

    cache_path = out / "radii.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except json.JSONDecodeError:
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    plan = []   # (query, cache key or None, calibration job)
    for e in entries:
        if e.method != "dense":
            continue
        for image in images:
            x = data.x_test[image].reshape(-1).double().numpy()
            label = int(data.y_test[image])
            for norm in cfg.norms:
                q = {"arch": e.arch, "image": image, "norm": norm, "label": label, "eps": cfg.fixed_eps(norm),
                     "attack_radius": None}
                ck = f"{e.fingerprint}|{image}|{norm}|{cfg.seed}|{cfg.calibration_time:g}"
                plan.append((q, ck, (e.network, x, label, norm, cfg.seed, cfg.calibration_time)))
    if cfg.radius == "calibrated":
        todo = [(ck, job) for _, ck, job in plan if ck not in cache]
        if todo:
            ex = executor or make_executor(cfg.executor, cfg.jobs)
            jobs = {id(job): ck for ck, job in todo}
            try:
                with Progress(TextColumn("radii"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console, disable=not progress) as bar:
                    task = bar.add_task("radii", total=len(todo))
                    for job, r in ex.imap_unordered(_calibrate, [job for _, job in todo]):
                        cache[jobs[id(job)]] = float(r)
                        _write_json_atomic(cache_path, cache)   # each one kept at once (resume)
                        bar.update(task, advance=1)
            finally:
                if executor is None:
                    ex.close()
        for q, ck, _ in plan:
            q["attack_radius"] = cache[ck]
            q["eps"] = float(f"{cfg.radius_fraction * cache[ck]:.6g}")
    return [q for q, _, _ in plan]


def export_suite(cfg: ExperimentConfig, entries: list[NetEntry], data, queries: list[dict],
                 out: Path) -> Path | None:
    """The run's queries as a VNN-COMP suite: ``vnnlib/*.vnnlib`` (one per architecture, image and
    norm, shared by that architecture's networks) and ``instances.csv`` (rows ``onnx,vnnlib,timeout``,
    paths relative to ``out``).

    L1 balls have no VNN-LIB form, so only the L∞ queries are exported. Returns the CSV path, or
    ``None`` when there is nothing to export (no ONNX files, or only L1 queries).
    """
    from solvers.network.vnnlib import write_vnnlib

    linf = [q for q in queries if q["norm"] == "linf"]
    if not cfg.export_onnx or not linf:
        return None
    vdir = out / "vnnlib"
    vdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in linf:
        path = vdir / f"{q['arch']}_img{q['image']}_linf_eps{q['eps']:.6g}.vnnlib"
        write_vnnlib(make_spec(data, q["image"], "linf", q["eps"]), path)
        lines += [f"{e.onnx},{path.relative_to(out)},{cfg.time_limit:g}" for e in entries if e.arch == q["arch"]]
    csv_path = out / "instances.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


# ============================================================================ queries
def query_key(net_id: str, image: int, norm: str) -> str:
    return f"{net_id}|img{image}|{norm}"


def build_jobs(cfg: ExperimentConfig, entries: list[NetEntry], data, queries: list[dict]):
    """Every (network, query) pair as a :class:`~mipprune.experiment.executors.QueryJob`; dense nets first (the long
    ones), so that a pool finishes with short jobs. The job's fingerprint covers the network, the
    radius, the time limit, the backend and the verify options (a change recomputes the query)."""
    from mipprune.experiment.executors import QueryJob

    jobs = []
    for e in sorted(entries, key=lambda e: (e.method != "dense", -e.neurons)):
        for q in queries:
            if q["arch"] != e.arch:
                continue
            key = query_key(e.net_id, q["image"], q["norm"])
            fp = content_hash({"net": e.fingerprint, "eps": q["eps"], "time_limit": cfg.time_limit,
                        "backend": cfg.backend, "options": cfg.verify_options})
            meta = {"net_id": e.net_id, "arch": e.arch, "method": e.method, "sparsity": e.sparsity,
                    "image": q["image"], "norm": q["norm"], "eps": q["eps"], "attack_radius": q["attack_radius"],
                    "fingerprint": fp}
            jobs.append(QueryJob(key, e.network, make_spec(data, q["image"], q["norm"], q["eps"]),
                                 float(cfg.time_limit), cfg.backend, dict(cfg.verify_options), meta))
    return jobs


def run_queries(cfg: ExperimentConfig, jobs, store: ResultStore, *, executor=None, progress: bool = True,
                console=None) -> tuple[int, int]:
    """Run the jobs not already in ``store`` on the configured executor, appending each row as it
    arrives. Returns ``(n_run, n_skipped)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mipprune.experiment import executors

    todo = [j for j in jobs if not store.done(j.key, j.meta["fingerprint"])]
    skipped = len(jobs) - len(todo)
    if not todo:
        return 0, skipped
    ex = executor or executors.make_executor(cfg.executor, cfg.jobs)
    counts: dict[str, int] = {}
    try:
        with Progress(TextColumn("queries"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, disable=not progress) as bar:
            task = bar.add_task("queries", total=len(todo), info="")
            for _job, row in ex.imap_unordered(executors.solve_query, todo):
                store.append(row)
                counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
                bar.update(task, advance=1, info=" ".join(f"{k}:{v}" for k, v in sorted(counts.items())))
    finally:
        if executor is None:
            ex.close()
    return len(todo), skipped


# ============================================================================ result store (resume)
class ResultStore:
    """Rows of finished queries in a JSONL file, appended (and fsync'ed) one by one.

    On open the existing rows are read back; a torn last line (a crash mid-write) is ignored. A row
    counts as done for a job only if its ``fingerprint`` matches (a changed config recomputes).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[row["key"]] = row   # a later row of the same key wins

    def done(self, key: str, fingerprint: str) -> bool:
        row = self.rows.get(key)
        return row is not None and row.get("fingerprint") == fingerprint

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row


