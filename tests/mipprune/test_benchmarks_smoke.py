"""The benchmark scripts run end to end at toy size (their real sizes are for `benchmarks/`, not CI)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_selection_synthetic_section_writes_rows_for_every_method(tmp_path):
    out = tmp_path / "sel.json"
    bench = _load("bench_selection")
    assert bench.main(["--sizes", "16", "--n", "400", "--m", "4", "--time-limit", "2", "--time-limit-large", "2",
                       "--skip", "layer", "digits", "teacher", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["section"] == "synthetic"]
    assert {r["method"] for r in rows} == set(bench.SOLVER_METHODS)
    exact = next(r for r in rows if r["method"] == "exact")
    # exact is optimal among the methods on the same problem (it may only tie heuristics)
    assert all(r["error"] >= exact["error"] * (1 - 1e-9) for r in rows if r["error"] is not None)
    assert exact["bound"] is not None and exact["bound"] <= exact["error"] + 1e-12


def test_bench_exact_runs_and_reports_a_proven_gap(tmp_path):
    out = tmp_path / "exact.json"
    bench = _load("bench_exact")
    assert bench.main(["--channels", "64", "--cols", "1", "--n", "800", "--m", "4", "--time-limit", "5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    exact = [r for r in rows if str(r.get("method", "")).startswith("exact")]
    assert exact and all(r["gap"] is not None and r["gap"] >= 0 for r in exact)
