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
    assert bench.main(["--channels", "64", "--cols", "1", "--n", "800", "--m", "4", "--time-limit", "5",
                       "--restart", "on", "off", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    exact = {r["method"]: r for r in rows if str(r.get("method", "")).startswith("exact")}
    assert set(exact) == {"exact-bnb-block-conditional", "exact-bnb-block-conditional-norestart"}
    assert all(r["gap"] is not None and r["gap"] >= 0 for r in exact.values())
    assert exact["exact-bnb-block-conditional-norestart"]["restarts"] is None


def test_bench_exact_network_records_every_group_with_a_valid_bound_per_shift(tmp_path):
    out = tmp_path / "net.json"
    bench = _load("bench_exact")
    assert bench.main(["--network", "teacher", "--budgets", "0.5", "--net-time-limit", "1",
                       "--shifts", "block", "ascent", "--restart", "on", "off", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["layer"] for r in rows} == {"2", "4"}         # the teacher–student MLP's two hidden groups
    for r in rows:
        assert 0 < r["k"] < r["C"]
        for shift in ("block", "ascent"):
            x = r[shift]
            assert x["bound"] is not None and x["bound"] <= x["error"] * (1 + 1e-9) + 1e-12
            assert 0 <= x["gap"] <= 1
        assert r["block-norestart"]["restarts"] is None and r["block-norestart"]["bound"] <= r["block"]["error"] * (1 + 1e-9) + 1e-12
    assert set(data["worst_gap"]) == {"block", "ascent", "block-norestart", "ascent-norestart"}
    assert data["worst_gap"]["block"] == max(r["block"]["gap"] for r in rows)
