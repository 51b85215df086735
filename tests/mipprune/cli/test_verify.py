"""``mipprune verify`` / ``verify-suite`` end to end, the suite's summary logic, and the two verify
examples. Small instances are built here (onnx.helper + write_vnnlib); shared MNIST ones where present."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests.mipprune.conftest import run_cli  # noqa: E402
from mipprune.verification.suite import InstanceResult, read_instances, run_suite, summarize  # noqa: E402
from solvers.network.ir import Network  # noqa: E402
from solvers.network.spec import Spec  # noqa: E402
from solvers.network.vnnlib import load_vnnlib, read_result, write_vnnlib  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _tiny_onnx(path: Path, n_in: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(8, n_in)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> Path:
    """A benchmark folder: one tiny network, one robust and one non-robust property."""
    d = tmp_path_factory.mktemp("bench")
    (d / "onnx").mkdir()
    (d / "vnnlib").mkdir()
    net = Network.from_onnx(_tiny_onnx(d / "onnx" / "tiny.onnx"))
    x0 = np.full(4, 0.5)
    label = int(np.argmax(net.forward(x0)))
    write_vnnlib(Spec.robustness(x0, 1e-4, label, 3), d / "vnnlib" / "robust.vnnlib")        # unsat
    write_vnnlib(Spec.robustness(x0, 0.5, label, 3), d / "vnnlib" / "wide.vnnlib")
    (d / "instances.csv").write_text("onnx/tiny.onnx,vnnlib/robust.vnnlib,20\nonnx/tiny.onnx,vnnlib/wide.vnnlib,20\n")
    return d


def test_verify_writes_a_valid_unsat_result_on_a_tiny_robust_instance(tiny_bench, tmp_path, capsys):
    res = tmp_path / "out.txt"
    code, out, err = run_cli(["verify", str(tiny_bench / "onnx" / "tiny.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib"),
                           "--timeout", "20", "--result", str(res)], capsys)
    assert code == 0, err
    assert "unsat (verified)" in out and "decided by" in out
    assert read_result(res) == ("unsat", None, None)


def test_verify_sat_result_holds_a_counterexample_that_checks_out(shared_bench, tmp_path, capsys):
    onnx_path = shared_bench / "onnx" / "mnist-net_256x2.onnx"
    prop = shared_bench / "vnnlib" / "prop_1_0.03.vnnlib"        # consensus: sat
    res = tmp_path / "result.txt"
    code, out, err = run_cli(["verify", str(onnx_path), str(prop), "--timeout", "30", "--result", str(res)], capsys)
    assert code == 0, err
    assert "sat (falsified)" in out
    word, x, y = read_result(res)
    assert word == "sat" and x.shape == (784,) and y.shape == (10,)
    net = Network.from_onnx(onnx_path)
    (spec,) = load_vnnlib(prop, 784, 10)
    assert spec.is_counterexample(net, x)
    np.testing.assert_allclose(net.forward(x), y, rtol=0, atol=0)   # the file holds the float64 forward


def test_verify_reports_missing_files_and_shape_mismatch_as_clear_errors(tiny_bench, tmp_path, capsys):
    code, _, err = run_cli(["verify", str(tmp_path / "none.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib")], capsys)
    assert code == 2 and "ONNX file must exist" in err
    code, _, err = run_cli(["verify", str(tiny_bench / "onnx" / "tiny.onnx"), str(tmp_path / "none.vnnlib")], capsys)
    assert code == 2 and "VNN-LIB file must exist" in err
    # a 784-input property on a 64-input network
    net64 = _tiny_onnx(tmp_path / "net64.onnx", n_in=64)
    prop784 = tmp_path / "p784.vnnlib"
    write_vnnlib(Spec.robustness(np.full(784, 0.5), 0.01, 0, 3), prop784)
    code, _, err = run_cli(["verify", str(net64), str(prop784)], capsys)
    assert code == 2 and "must declare 64 inputs" in err and "got 784" in err
    code, _, err = run_cli(["verify", str(net64), str(prop784), "--timeout", "0"], capsys)
    assert code == 2 and "--timeout must be > 0" in err


def test_verify_suite_writes_rows_and_flags_verdicts_against_a_wrong_consensus(tiny_bench, tmp_path, capsys):
    out_csv, out_json = tmp_path / "rows.csv", tmp_path / "summary.json"
    code, out, err = run_cli(["verify-suite", str(tiny_bench), "--out", str(out_csv), "--json", str(out_json)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert [r["property"] for r in rows] == ["robust.vnnlib", "wide.vnnlib"]
    assert rows[0]["verdict"] == "unsat" and rows[1]["verdict"] in ("sat", "unsat")
    assert set(rows[0]) >= {"network", "property", "verdict", "time_s", "stage", "binaries", "nodes"}
    summary = json.loads(out_json.read_text())
    assert summary["ours"]["solved"] == 2 and summary["ours"]["wrong"] == 0

    # a ground truth that contradicts us: the suite must count it as WRONG and exit non-zero
    bench2 = tmp_path / "bench2"
    bench2.mkdir()
    for sub in ("onnx", "vnnlib"):
        os.symlink(tiny_bench / sub, bench2 / sub)
    (bench2 / "instances.csv").write_text((tiny_bench / "instances.csv").read_text())
    opposite = {"sat": "unsat", "unsat": "sat"}
    with open(bench2 / "ground_truth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["network", "vnnlib", "consensus", "toolA_verdict", "toolA_time_s_raw"])
        for r in rows:
            w.writerow([r["network"], r["property"], opposite[r["verdict"]], r["verdict"], "1.5"])
    code, out, _ = run_cli(["verify-suite", str(bench2), "--out", str(tmp_path / "rows2.csv"), "--jobs", "2"], capsys)
    assert code == 1
    assert "WRONG 2" in out and "toolA" in out


def test_suite_options_filter_and_time_limits(tiny_bench, tmp_path):
    rows = run_suite(tiny_bench, filter="wide", timeout_scale=0.5, max_timeout=3)
    assert len(rows) == 1 and rows[0].property == "wide.vnnlib" and rows[0].timeout_s == 3
    rows = run_suite(tiny_bench, filter="robust", timeout_scale=0.1)
    assert rows[0].timeout_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="filter 'nothing' must match at least one instance"):
        run_suite(tiny_bench, filter="nothing")
    with pytest.raises(ValueError, match="jobs must be >= 1; got 0"):
        run_suite(tiny_bench, jobs=0)
    bad = tmp_path / "bad.csv"
    bad.write_text("onnx/tiny.onnx,vnnlib/robust.vnnlib\n")
    with pytest.raises(ValueError, match="line 1: expected 'onnx,vnnlib,timeout'"):
        read_instances(tiny_bench, bad)


def test_a_subset_csv_kept_outside_the_benchmark_names_its_files_relative_to_it(tiny_bench, tmp_path):
    subset = tmp_path / "hard.csv"          # the benchmark's own relative names, in a file elsewhere
    subset.write_text("onnx/tiny.onnx,vnnlib/wide.vnnlib,7\n")
    (inst,) = read_instances(tiny_bench, subset)
    assert inst.network == (tiny_bench / "onnx" / "tiny.onnx").resolve() and inst.timeout == 7
    assert inst.property == (tiny_bench / "vnnlib" / "wide.vnnlib").resolve()
    (row,) = run_suite(tiny_bench, instances=subset, max_timeout=5)
    assert row.property == "wide.vnnlib" and row.verdict in ("sat", "unsat")
    # a name found nowhere keeps the CSV-relative path, and the suite says which file is missing
    subset.write_text("onnx/none.onnx,vnnlib/wide.vnnlib,7\n")
    (row,) = run_suite(tiny_bench, instances=subset)
    assert row.verdict == "error" and str(tmp_path / "onnx" / "none.onnx") in row.message


def test_suite_turns_unsupported_networks_into_error_rows(tmp_path):
    (tmp_path / "net.onnx").write_bytes(b"not onnx")
    write_vnnlib(Spec(np.zeros(2), np.ones(2), ((np.ones((1, 2)), np.zeros(1)),)), tmp_path / "p.vnnlib")
    (tmp_path / "instances.csv").write_text("net.onnx,p.vnnlib,5\n")
    (row,) = run_suite(tmp_path)
    assert row.verdict == "error" and "valid ONNX model" in row.message


def test_summary_counts_tools_and_wrong_answers_on_the_same_instances():
    def row(prop, verdict, t):
        return InstanceResult("n.onnx", prop, 10.0, verdict, t)

    rows = [row("a", "sat", 1.0), row("b", "unsat", 3.0), row("c", "timeout", 10.0)]
    gt = {("n.onnx", "a"): {"consensus": "sat", "t1_verdict": "sat", "t1_time_s_raw": "2.0"},
          ("n.onnx", "b"): {"consensus": "unsat", "t1_verdict": "sat", "t1_time_s_raw": "4.0"},
          ("n.onnx", "c"): {"consensus": "unknown", "t1_verdict": "unsat", "t1_time_s_raw": "6.0"},
          ("n.onnx", "z"): {"consensus": "sat", "t1_verdict": "sat", "t1_time_s_raw": "1.0"}}   # not run: ignored
    for r in rows:
        r.consensus = gt[("n.onnx", r.property)]["consensus"]
    s = summarize(rows, gt)
    assert s["ours"] == {**s["ours"], "solved": 2, "sat": 1, "unsat": 1, "timeout": 1, "wrong": 0,
                         "median_time_s": 2.0}
    assert s["tools"]["t1"] == {"solved": 2, "wrong": 1, "median_time_s": 4.0}
    rows[1].verdict = "sat"
    assert summarize(rows, gt)["ours"]["wrong"] == 1
    # answers slower than the limit we ran with do not count for the tool
    for r in rows:
        r.timeout_s = 3.0
    assert summarize(rows, gt)["tools"]["t1"] == {"solved": 1, "wrong": 0, "median_time_s": 2.0}


def _example(args, timeout=180) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_verify_onnx_example_on_a_shared_instance(shared_bench):
    out = _example([EXAMPLES / "verify_onnx.py", shared_bench / "onnx" / "mnist-net_256x2.onnx",
                    shared_bench / "vnnlib" / "prop_0_0.03.vnnlib", "--timeout", "30"])
    assert "result: unsat" in out       # consensus of the competition: unsat


def test_verify_torch_example_trains_and_verifies():
    out = _example([EXAMPLES / "verify_torch.py"])
    acc = float(out.split("test accuracy: ")[1].split()[0])
    assert acc > 0.9
    summary = out.split("summary: ")[1]
    counts = dict(part.rsplit(" ", 1) for part in summary.strip().split(", "))
    assert sum(int(v) for v in counts.values()) == 8
    assert int(counts["verified"]) >= 1 and int(counts["falsified"]) >= 1


def test_shared_256x2_network_whole_suite_has_no_wrong_verdict(shared_bench):
    """All 30 VNN-COMP 2022 instances of the 256×2 network (about 6 s on 2 cores, each well under
    its 60 s cap): every verdict agrees with the competition's consensus, and every "sat" carries a
    counterexample that is re-checked here in float64."""
    rows = run_suite(shared_bench, network="256x2", jobs=2, max_timeout=60)
    assert len(rows) == 30
    assert all(r.consensus in ("sat", "unsat") for r in rows)
    assert [r.property for r in rows if r.wrong] == []
    net = Network.from_onnx(shared_bench / "onnx" / "mnist-net_256x2.onnx")
    for r in rows:
        if r.verdict == "sat":   # re-check every counterexample here, independently of the suite
            specs = load_vnnlib(shared_bench / "vnnlib" / r.property, net.n_inputs, net.n_outputs)
            x = np.asarray(r.counterexample, dtype=np.float64)
            assert any(s.is_counterexample(net, x) for s in specs), r.property
    decided = [r for r in rows if r.solved]
    assert len(decided) >= 25, f"only {len(decided)} of 30 decided: {[(r.property, r.verdict) for r in rows]}"


def test_verify_always_writes_a_result_file_with_the_reason(tiny_bench, tmp_path, capsys):
    res = tmp_path / "err.txt"
    code, _, err = run_cli(["verify", str(tmp_path / "none.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib"),
                            "--result", str(res)], capsys)
    assert code == 2 and "ONNX file must exist" in err
    text = res.read_text()
    assert text.splitlines()[0] == "error" and "ONNX file must exist" in text
    assert read_result(res) == ("error", None, None)
    code, _, err = run_cli(["verify", str(tiny_bench / "onnx" / "tiny.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib"),
                            "--timeout", "0", "--result", str(res)], capsys)
    assert code == 2 and read_result(res)[0] == "error" and "--timeout must be > 0" in res.read_text()
    code, _, err = run_cli(["verify", str(tiny_bench / "onnx" / "tiny.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib"),
                            "--device", "tpu", "--result", str(res)], capsys)
    assert code == 2 and "device must be" in err and read_result(res)[0] == "error"


def test_verify_suite_takes_timeout_like_verify(tiny_bench, tmp_path, capsys):
    out_csv = tmp_path / "rows.csv"
    code, out, err = run_cli(["verify-suite", str(tiny_bench), "--timeout", "7", "--out", str(out_csv)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert {float(r["timeout_s"]) for r in rows} == {7.0}
    rows = run_suite(tiny_bench, timeout=9, max_timeout=4)
    assert {r.timeout_s for r in rows} == {4.0}
    with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
        run_suite(tiny_bench, timeout=0)
    code, _, err = run_cli(["verify-suite", str(tiny_bench), "--device", "tpu", "--out", str(out_csv)], capsys)
    assert code == 2 and "device must be" in err


@pytest.mark.parametrize("option,good,bad,message", [("--threads", "2", "0", "threads must be an integer >= 1"),
                                                     ("--precision", "float32", "half", "precision must be one of")])
def test_search_options_reach_verify_and_bad_values_are_errors(tiny_bench, tmp_path, capsys, option, good, bad,
                                                                message):
    res = tmp_path / "out.txt"
    args = ["verify", str(tiny_bench / "onnx" / "tiny.onnx"), str(tiny_bench / "vnnlib" / "robust.vnnlib"),
            "--timeout", "20", "--result", str(res)]
    code, out, err = run_cli(args + [option, good], capsys)
    assert code == 0 and read_result(res) == ("unsat", None, None), err
    code, _, err = run_cli(args + [option, bad], capsys)
    assert code == 2 and message in err
    assert read_result(res)[0] == "error" and message in res.read_text()
    out_csv = tmp_path / "rows.csv"
    code, _, err = run_cli(["verify-suite", str(tiny_bench), option, bad, "--out", str(out_csv)], capsys)
    assert code == 2 and message in err and not out_csv.exists()   # up front
    code, _, err = run_cli(["verify-suite", str(tiny_bench), option, good, "--out", str(out_csv)], capsys)
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert code == 0 and {r["verdict"] for r in rows} <= {"sat", "unsat"} and len(rows) == 2, err
