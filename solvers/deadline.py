"""Run a function in a child process and stop it at a wall-clock deadline.

For solvers that look at their own clock only between phases: HiGHS's root cut separation on an OVAL21
wide net's MILP (9,181 columns, 255,000 nonzeros) ran 5.6 s past a 3 s ``time_limit``, its interrupt
callbacks included, and that broke ``verify``'s promise to keep the time limit to within a second. A
child process can be stopped exactly. The child is forked (Linux only; a few ms, nothing to re-import, and
unlike ``spawn``/``forkserver`` it never re-runs the caller's unguarded ``__main__`` script); it runs
only the solver, never torch or CUDA, which is what keeps a fork of a multi-threaded process safe.
Elsewhere, or where the caller is itself a daemonic process (``multiprocessing.Pool``
workers cannot have children), the function runs in-process and only its own time limit applies.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
import warnings
from typing import Any, Callable

from solvers.errors import SolverError

__all__ = ["call_with_deadline", "can_isolate"]


def can_isolate() -> bool:
    """Whether :func:`call_with_deadline` can run the function in a child process here."""
    # Linux only: on macOS a forked child of a process that used the system frameworks may crash
    return sys.platform.startswith("linux") and not mp.current_process().daemon


def _child(conn, fn, args, kwargs) -> None:
    try:
        conn.send((True, fn(*args, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
        conn.send((False, exc))
    finally:
        conn.close()


def call_with_deadline(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, deadline: float,
                       grace: float = 0.25) -> tuple[bool, Any]:
    """``fn(*args, **kwargs)`` in a child process; ``(True, value)`` when it returns by ``deadline``
    (``time.perf_counter()`` seconds) plus ``grace``, else ``(False, None)`` with the child killed.
    The child's exceptions are re-raised here. ``fn``, its arguments and its value must pickle."""
    if not can_isolate():
        return True, fn(*args, **(kwargs or {}))
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs or {}), daemon=True)
    with warnings.catch_warnings():   # Python >= 3.12 warns on any fork of a multi-threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        proc.start()
    send.close()
    try:
        if recv.poll(max(0.0, deadline + grace - time.perf_counter())):
            try:
                ok, value = recv.recv()
            except EOFError:   # the child died without an answer (killed from outside, out of memory)
                proc.join()
                raise SolverError(f"the solver's process ended without an answer (exit code {proc.exitcode}; "
                                  "out of memory?)") from None
            if not ok:
                raise value
            return True, value
        return False, None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
