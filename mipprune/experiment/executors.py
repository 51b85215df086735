"""Where verification queries run: inline, a local process pool, or a Ray cluster.

Torch-free on purpose: pool workers import only this module and :mod:`solvers`, so they start fast
and never load torch. Every executor yields ``(job, row)`` pairs *as each query finishes*, so the
caller can append each row to disk at once (an interrupted run loses nothing already solved).

``solve_query`` is the unit of work: one :class:`QueryJob` (a network, a spec, a time limit) in, one
JSON-ready row out. Workers are started with the ``spawn`` method (forking a process that already
runs torch's or OpenMP's threads can deadlock); each worker is one process on one core, so its BLAS
runs single-threaded (threads only add sync stalls on these small products, and the pool is the
parallelism), and it is warmed up once (imports, first HiGHS call) so that no query's time includes
one-off start-up costs.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from solvers.errors import InvalidInputError, SolverNotAvailableError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class QueryJob:
    """One verification query: ``network`` (solvers.Network) against ``spec`` (solvers.Spec).

    ``key`` identifies the query across runs (resume); ``meta`` is copied into the result row
    (network id, method, sparsity, image, norm, eps, fingerprint, ...); ``options`` are extra keyword
    arguments of :func:`mipprune.verify`.
    """

    key: str
    network: object
    spec: object
    time_limit: float
    backend: str = "highs"
    options: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


_WARM = False


def warm_up() -> None:
    """Import and exercise the verification stack once in this process (idempotent): the first
    ``verify`` call otherwise pays module imports and HiGHS start-up inside its measured time."""
    global _WARM
    if _WARM:
        return
    import numpy as np

    import solvers
    from mipprune.verification.verify import verify
    from solvers.network.layers import Dense, ReLU
    from solvers.network.ir import Network

    net = Network([Dense(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.zeros(2)), ReLU(),
                   Dense(np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([0.0, 0.1]))], (2,))
    spec = solvers.Spec.robustness(np.array([0.5, 0.5]), 0.5, 1, 2)
    verify(net, spec, time_limit=5.0, attack=False, bounds_method="interval")
    _WARM = True


def _worker_init() -> None:
    """Pool / Ray worker start: single-threaded BLAS for the whole process, then :func:`warm_up`."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:   # threadpoolctl comes with scikit-learn; without it BLAS keeps its setting
        pass
    warm_up()


def _ray_task(fn: Callable, job):
    _worker_init()
    return fn(job)


def _single_threaded():
    """Context: single-threaded BLAS in *this* process while inline queries run (restored after)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def solve_query(job: QueryJob) -> dict:
    """Run :func:`mipprune.verify` on one job and return a JSON-ready row.

    Row fields (times in seconds): ``verdict`` ("verified" | "falsified" | "unknown" | "timeout"),
    ``time`` (whole query, wall clock), ``stage``, ``stage_times``, ``bounds_time`` (seconds of the
    CROWN bounds computed here to count unstable neurons), ``unstable`` (ReLUs whose CROWN
    pre-activation bounds straddle 0 over the input region: the binaries a big-M MILP needs),
    ``milp_vars``, ``milp_binaries``, ``milp_nodes`` (the MILP ``verify`` built, 0 if none),
    ``counterexample`` (list of floats or None), ``message``, ``finished_at`` (Unix time), ``pid``.
    """
    from mipprune.verification.bounds import compute_bounds
    from mipprune.verification.verify import verify

    spec, net = job.spec, job.network
    t0 = time.perf_counter()
    b = compute_bounds(net, spec.lower, spec.upper, "crown", l1_center=spec.l1_center, l1_radius=spec.l1_radius)
    bounds_time = time.perf_counter() - t0
    res = verify(net, spec, time_limit=job.time_limit, backend=job.backend, **job.options)
    cex = res.counterexample
    return {
        "key": job.key,
        **job.meta,
        "time_limit": job.time_limit,
        "verdict": str(res.verdict.value),
        "time": float(res.time),
        "stage": res.stage,
        "stage_times": {k: float(v) for k, v in (res.stage_times or {}).items()},
        "bounds_time": bounds_time,
        "unstable": int(sum(b.n_unstable())),
        "milp_vars": int(res.milp_vars),
        "milp_binaries": int(res.milp_binaries),
        "milp_nodes": int(res.milp_nodes),
        "counterexample": None if cex is None else [float(v) for v in cex],
        "message": res.message,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


# ---------------------------------------------------------------------------------------- executors
class LocalExecutor:
    """``jobs == 1``: run inline (no subprocess); else a ``ProcessPoolExecutor`` of ``jobs`` workers,
    started on first use and kept (warm) until :meth:`close`."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise InvalidInputError(f"jobs must be >= 1; got {jobs}")
        self.jobs = int(jobs)
        self._pool: ProcessPoolExecutor | None = None

    def imap_unordered(self, fn: Callable, jobs: Iterable) -> Iterator[tuple]:
        jobs = list(jobs)
        if self.jobs == 1:
            with _single_threaded():
                warm_up()
                for job in jobs:
                    yield job, fn(job)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)
        pending = {self._pool.submit(fn, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    yield job, fut.result()
        finally:
            for fut in pending:   # on an error or Ctrl-C: drop what has not started
                fut.cancel()

    def close(self) -> None:
        """Shut the worker pool down (queued jobs are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """The same jobs as Ray tasks (one CPU each). Connects to the cluster at ``$RAY_ADDRESS`` when set;
    otherwise starts a local Ray with ``num_cpus=jobs``, unless Ray is already initialised (e.g.
    connected to a cluster with ``ray.init(address=...)`` before the run)."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise InvalidInputError(f"jobs must be >= 1; got {jobs}")
        try:
            import ray
        except ImportError as exc:
            raise SolverNotAvailableError(
                "executor 'ray' needs the optional package ray (pip install 'mipprune[ray]'); "
                f"got ImportError: {exc}") from None
        self.ray = ray
        self.jobs = int(jobs)
        self._started = False
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                # A cluster: ray.init reads the address; the cluster, not us, decides the CPUs.
                ray.init(log_to_driver=False, configure_logging=False)
            else:
                ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            self._started = True

    def imap_unordered(self, fn: Callable, jobs: Iterable) -> Iterator[tuple]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        pending = {remote.remote(fn, job): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    yield job, ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_executor(kind: str = "local", jobs: int = 1):
    """An executor by name: ``"local"`` (inline or process pool) or ``"ray"``."""
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "ray":
        return RayExecutor(jobs)
    raise InvalidInputError(f"executor must be one of {list(EXECUTORS)}; got {kind!r}")


__all__ = ["QueryJob", "solve_query", "warm_up", "LocalExecutor", "RayExecutor", "make_executor", "EXECUTORS"]
