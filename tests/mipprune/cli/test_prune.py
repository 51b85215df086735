"""``mipprune prune`` end to end (in-process through the console-script entry point)."""
from __future__ import annotations

import json

import pytest
import torch

from solvers.errors import InvalidInputError
from tests.mipprune.conftest import run_cli
from mipprune.data import load_digits_data, make_loader
from mipprune.models import mlp
from mipprune.train import count_flops, count_params, evaluate, train_classifier


def test_prune_default_model_writes_consistent_json_and_model(tmp_path, capsys):
    js, pt = tmp_path / "run.json", tmp_path / "pruned.pt"
    code, out, err = run_cli(["prune", "--epochs", "2", "--method", "magnitude", "--sparsity", "0.5",
                           "--json", str(js), "--out", str(pt)], capsys)
    assert code == 0, err
    assert "Channel selection" in out and "Summary" in out
    rec = json.loads(js.read_text())
    assert rec["config"]["method"] == "magnitude" and rec["config"]["input_shape"] == [1, 8, 8]
    assert [(r["kept"], r["total"]) for r in rec["layers"]] == [(8, 16), (16, 32), (32, 64)]
    p, f, acc = rec["params"], rec["flops"], rec["accuracy"]
    assert p["after"] < p["before"] and p["ratio"] == pytest.approx(p["after"] / p["before"])
    assert f["after"] < f["before"] and f["ratio"] == pytest.approx(f["after"] / f["before"])
    assert acc["pruned_finetuned"] is None and rec["budget"] is None and rec["tecu_history"] is None
    assert all(0 <= a <= 1 for a in acc.values() if a is not None)
    assert acc["pruned_reconstructed"] > acc["pruned_no_reconstruction"]
    assert rec["time"]["total"] >= rec["time"]["train"] + rec["time"]["select"]
    # the saved model is the one the numbers describe
    pruned = torch.load(pt, weights_only=False)
    data = load_digits_data(seed=0)
    assert count_params(pruned) == p["after"] and count_flops(pruned, (1, 8, 8)) == f["after"]
    assert evaluate(pruned, (data.x_test, data.y_test)) == pytest.approx(acc["pruned_reconstructed"])


def test_prune_loads_a_pickled_flat_input_model(tmp_path, capsys):
    data = load_digits_data(seed=0, flat=True)
    torch.manual_seed(0)
    net = train_classifier(mlp((64, 32, 32, 10)), make_loader(data.x_train, data.y_train, shuffle=True),
                           epochs=3, lr=1e-2)
    path, js = tmp_path / "mlp.pt", tmp_path / "mlp.json"
    torch.save(net, path)
    code, out, err = run_cli(["prune", "--model", str(path), "--method", "random", "--sparsity", "0.25",
                           "--one-shot", "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert rec["config"]["input_shape"] == [64] and rec["config"]["sequential"] is False
    assert [(r["kept"], r["total"]) for r in rec["layers"]] == [(24, 32), (24, 32)]
    assert rec["accuracy"]["dense"] == pytest.approx(evaluate(net, (data.x_test, data.y_test)))
    assert rec["params"]["after"] < rec["params"]["before"]


@pytest.mark.parametrize("metric,target,method", [("flops", 0.5, "greedy"), ("params", 0.4, "hrank")])
def test_prune_budget_with_finetuning_lands_in_the_window(metric, target, method, tmp_path, capsys):
    js = tmp_path / "budget.json"
    code, out, err = run_cli(["prune", "--epochs", "2", "--method", method, f"--{metric}", str(target),
                           "--positions", "4", "--finetune", "1", "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    ratio = rec[metric]["ratio"]
    assert 0.995 * target <= ratio <= target
    b = rec["budget"]
    assert b["metric"] == metric and b["in_window"] and b["achieved_ratio"] == pytest.approx(ratio)
    assert b["allocation"]["status"] == "optimal" and rec["config"][f"{metric}_target"] == target
    assert rec["config"]["sparsity"] is None and rec["config"]["finetune_epochs"] == 1
    assert 0 <= rec["accuracy"]["pruned_finetuned"] <= 1 and rec["time"]["finetune"] > 0
    assert "Budget" in out and "hit" in out and "fine-tuning" in out


@pytest.mark.parametrize("args,message", [
    (["--flops", "1.5"], "flops must be in (0, 1]; got 1.5"),
    (["--flops", "0.5", "--sparsity", "0.5"], "exactly one of sparsity"),
    (["--finetune", "-1"], "--finetune must be >= 0 epochs; got -1"),
    (["--sparsity", "1.5"], "sparsity must be in (0, 1); got 1.5"),
    (["--method", "nope"], "method must be one of"),
    (["--model", "/nonexistent/model.pt"], "--model must be an existing file; got '/nonexistent/model.pt'"),
    (["--epochs", "-1"], "--epochs must be >= 0; got -1"),
])
def test_prune_bad_options_give_one_red_line_and_exit_2(args, message, capsys):
    code, out, err = run_cli(["prune", *args], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_prune_on_cuda_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, out, err = run_cli(["prune", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err


def test_prune_rejects_a_file_that_is_not_a_module(tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save(mlp().state_dict(), path)
    code, out, err = run_cli(["prune", "--model", str(path)], capsys)
    assert code == 2 and "--model must hold a torch.nn.Module" in err and "got OrderedDict" in err


@pytest.mark.gpu
def test_prune_on_cuda_end_to_end(tmp_path, capsys):
    js = tmp_path / "cuda.json"
    code, out, err = run_cli(["prune", "--device", "cuda", "--epochs", "2", "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert rec["config"]["device"].startswith("cuda")
    assert rec["accuracy"]["pruned_reconstructed"] > rec["accuracy"]["pruned_no_reconstruction"]


def test_prune_exact_with_gap_and_cpsat_budget_reports_proven_gaps(tmp_path, capsys):
    """`--method exact --gap` through the CLI, widths from CP-SAT: every layer's gap is proven and,
    where the layer says optimal, within the requested gap."""
    js = tmp_path / "exact.json"
    code, out, err = run_cli(["prune", "--epochs", "2", "--method", "exact", "--gap", "0.01", "--flops", "0.5",
                              "--budget-backend", "cpsat", "--time-limit", "5", "--positions", "4",
                              "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert rec["config"]["gap"] == 0.01 and rec["budget"]["allocation"]["backend"] == "cpsat"
    assert 0.995 * 0.5 - 1e-9 <= rec["budget"]["achieved_ratio"] <= 0.5 + 1e-9
    for r in rec["layers"]:
        assert r["bound"] is not None and r["bound"] <= r["rel_error"] + 1e-12
        if r["status"] == "optimal":
            assert r["gap"] <= 0.01 + 1e-12
        else:
            assert r["status"] == "time_limit"


def test_gap_is_only_for_exact(capsys):
    code, out, err = run_cli(["prune", "--epochs", "1", "--method", "lasso", "--gap", "0.01"], capsys)
    assert code == 2 and "method must be one of ['exact'] to request a gap; got 'lasso'" in (out + err)


def test_method_options_are_parsed_and_reach_the_selection(tmp_path, capsys):
    from mipprune.cli.prune import parse_method_options

    assert parse_method_options(["workers=2", "restart=False", "shift=scalar", "rel=0.5"]) == {
        "workers": 2, "restart": False, "shift": "scalar", "rel": 0.5}
    assert parse_method_options(None) == {}
    for bad in ("workers", "=2", "workers="):
        with pytest.raises(InvalidInputError, match="--option must be NAME=VALUE"):
            parse_method_options([bad])
    # a name the method does not take is refused before any training
    code, out, err = run_cli(["prune", "--epochs", "1", "--method", "exact", "--option", "worker=2"], capsys)
    assert code == 2 and "method 'exact' takes no option 'worker'" in (out + err)
    js = tmp_path / "opts.json"
    code, out, err = run_cli(["prune", "--epochs", "1", "--method", "exact", "--time-limit", "3", "--positions", "2",
                              "--option", "warm_start=false", "--option", "lasso=false", "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert rec["config"]["method_options"] == {"warm_start": False, "lasso": False}
