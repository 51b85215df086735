"""solvers.deadline: a function in a child process, stopped at its deadline; its value and its
exceptions come back; in-process where no child can be made."""
from __future__ import annotations

import os
import time

import pytest

from solvers import deadline
from solvers.errors import SolverError


def _slow(seconds: float, value):
    time.sleep(seconds)
    return value


def _fail():
    raise SolverError("solver broke")


def _pid():
    return os.getpid()


def test_a_function_that_returns_in_time_gives_its_value_from_another_process():
    done, value = deadline.call_with_deadline(_slow, (0.0, {"x": [1, 2]}), deadline=time.perf_counter() + 10)
    assert done and value == {"x": [1, 2]}
    if deadline.can_isolate():
        assert deadline.call_with_deadline(_pid, deadline=time.perf_counter() + 10)[1] != os.getpid()


@pytest.mark.skipif(not deadline.can_isolate(), reason="no fork on this platform")
def test_a_function_past_its_deadline_is_stopped_there():
    t = time.perf_counter()
    done, value = deadline.call_with_deadline(_slow, (30.0, 1), deadline=t + 0.5, grace=0.1)
    assert not done and value is None
    assert time.perf_counter() - t < 2.0


def test_the_functions_exceptions_are_raised_in_the_caller():
    with pytest.raises(SolverError, match="solver broke"):
        deadline.call_with_deadline(_fail, deadline=time.perf_counter() + 10)


def test_without_a_child_process_the_function_runs_in_process(monkeypatch):
    monkeypatch.setattr(deadline, "can_isolate", lambda: False)
    done, value = deadline.call_with_deadline(_pid, deadline=time.perf_counter() - 1)
    assert done and value == os.getpid()
