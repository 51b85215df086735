"""``mipprune prune --model FILE --input-shape/--data``: models people bring, in their formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mipprune.model_io import save_model
from tests.mipprune.conftest import run_cli
from tests.mipprune.pruning.blocks import BLOCKS


def test_prune_a_pickled_resnet_block_on_random_inputs_writes_pickle_and_onnx(tmp_path, capsys):
    model = BLOCKS["basic"]().eval()
    path, out, onnx, js = (tmp_path / n for n in ("m.pt", "pruned.pt", "pruned.onnx", "run.json"))
    torch.save(model, path)
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8", "--method", "greedy",
                               "--sparsity", "0.5", "--out", str(out), "--onnx", str(onnx), "--json", str(js)], capsys)
    assert code == 0, err
    assert "no --data given" in text and "Channel selection" in text
    rec = json.loads(js.read_text())
    assert rec["random_inputs"] and rec["format"] == "pickle" and rec["input_shape"] == [3, 8, 8]
    assert rec["params"]["after"] < rec["params"]["before"] and rec["layers"]
    pruned = torch.load(out, weights_only=False)
    assert sum(p.numel() for p in pruned.parameters()) == rec["params"]["after"]
    assert onnx.is_file()


def test_prune_with_npy_data_and_labels_reports_accuracy(tmp_path, capsys):
    model = BLOCKS["inverted"]().eval()
    path, data, labels, js = (tmp_path / n for n in ("m.pt", "x.npy", "y.npy", "run.json"))
    torch.save(model, path)
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.save(data, x)
    np.save(labels, model(torch.from_numpy(x)).argmax(1).numpy())
    code, text, err = run_cli(["prune", "--model", str(path), "--data", str(data), "--labels", str(labels),
                               "--method", "lasso", "--flops", "0.7", "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert not rec["random_inputs"] and rec["accuracy"]["dense"] == 1.0
    assert 0 <= rec["accuracy"]["pruned"] <= 1 and rec["flops"]["after"] <= 0.7 * rec["flops"]["before"]


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_compiled_formats_are_refused_with_the_reason(fmt, tmp_path, capsys):
    path = save_model(BLOCKS["grouped"]().eval(), tmp_path / f"m.{fmt}", fmt, torch.randn(1, 3, 8, 8))
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8"], capsys)
    assert code == 2 and "pickled nn.Module" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--data", "x.npy"], "must come with --model"),
    (["--max-memory", "0"], "--max-memory must be > 0"),
])
def test_bad_generic_options(args, message, capsys):
    code, text, err = run_cli(["prune", *args], capsys)
    assert code == 2 and message in err
