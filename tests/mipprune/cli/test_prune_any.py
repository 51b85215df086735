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


@pytest.mark.parametrize("fmt,name,blocked", [
    ("torchscript", "shuffle", r"TorchScript m.pt \(converted by torch's TS2EPConverter\), whose ExportedProgram "
                               r"\(8 conv2d, 1 linear, 3 batch_norm\).*aten.scalar_tensor.default"),  # traced size math
    ("export", "shuffle", r"ExportedProgram \(8 conv2d, 1 linear, 3 batch_norm\).*aten.view.default to the shape "
                          r"\(sym_size_int\w*, 2, 3, 8, 8\)")])
def test_unprunable_files_are_refused_with_what_blocked_them(fmt, name, blocked, tmp_path, capsys):
    import re

    path = save_model(BLOCKS[name]().eval(), tmp_path / f"m.{'pt2' if fmt == 'export' else 'pt'}", fmt,
                      torch.randn(1, 3, 8, 8))
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "pickled nn.Module" in err and "Traceback" not in err
    assert re.search(blocked, err) and "torch.save(model, FILE)" in err


@pytest.mark.parametrize("name", ["basic", "inverted", "dense", "resnext"])
def test_torch_export_archive_is_lifted_and_pruned_like_the_module(name, tmp_path, capsys):
    from mipprune.model_io import load_model
    from mipprune.pruning.selector import ChannelSelector

    model = BLOCKS[name]().eval()
    path = save_model(model, tmp_path / "m.pt2", "export", torch.randn(2, 3, 8, 8))
    lifted, fmt = load_model(path)
    x = torch.randn(5, 3, 8, 8)  # another batch size than the exported one
    with torch.no_grad():
        assert fmt == "export" and torch.equal(lifted(x), model(x))
    data = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ours, theirs = (ChannelSelector("greedy", sparsity=0.5).fit(m, data) for m in (model, lifted))
    assert list(ours.masks_) == list(theirs.masks_)
    for a, b in zip(ours.masks_.values(), theirs.masks_.values()):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(theirs.prune(lifted)(x), ours.prune(model)(x))
    if name == "resnext":  # through the CLI: the pruned model goes back out as an archive
        out = tmp_path / "pruned.pt2"
        code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8", "--method", "greedy",
                                   "--sparsity", "0.5", "--out", str(out)], capsys)
        assert code == 0, err
        assert "(export)" in text
        program = torch.export.load(str(out))
        assert sum(p.numel() for p in program.module().parameters()) < sum(p.numel() for p in model.parameters())


def test_out_pt2_writes_a_torch_export_archive_of_the_pruned_model(tmp_path, capsys):
    model = BLOCKS["resnext"]().eval()
    path, out = tmp_path / "m.pt", tmp_path / "pruned.pt2"
    torch.save(model, path)
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8", "--method", "greedy",
                               "--sparsity", "0.5", "--out", str(out)], capsys)
    assert code == 0, err
    program = torch.export.load(str(out))
    x = torch.randn(1, 3, 8, 8)
    n_params = sum(p.numel() for p in program.module().parameters())
    assert n_params < sum(p.numel() for p in model.parameters())
    assert program.module()(x).shape == model(x).shape


def test_untraceable_model_error_names_the_module_and_line():
    from mipprune.pruning.selector import ChannelSelector
    from solvers.errors import InvalidInputError

    class Gate(torch.nn.Module):
        def forward(self, x):
            if x.mean() > 0:  # data-dependent control flow: fx cannot trace it
                return x
            return -x

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), Gate(), torch.nn.Conv2d(4, 2, 3))
    with pytest.raises(InvalidInputError, match=r"not analysed: .*TraceError.*in module '2' \(Gate\) at "
                                                 r"test_prune_any.py:\d+ `if x.mean\(\) > 0:"):
        ChannelSelector("greedy", sparsity=0.5).fit(model, [torch.randn(2, 3, 8, 8)])
    ok = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Gate(), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3),
                             torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 3))
    sel = ChannelSelector("greedy", sparsity=0.5).fit(ok, [torch.randn(2, 3, 8, 8)])
    assert "channel groups not analysed" in " ".join(str(sel.report()).split()) and "(Gate)" in str(sel.report())


@pytest.mark.parametrize("args,message", [
    (["--data", "x.npy"], "must come with --model"),
    (["--max-memory", "0"], "--max-memory must be > 0"),
])
def test_bad_generic_options(args, message, capsys):
    code, text, err = run_cli(["prune", *args], capsys)
    assert code == 2 and message in err
