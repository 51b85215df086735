"""TorchScript models (``torch.jit.save`` of scripted or traced modules): converted to a
``torch.export`` program by torch's converter, lifted, pruned, and written back as TorchScript."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mipprune.model_io import detect_format, load_model
from solvers.errors import InvalidInputError, UnsupportedLayerError
from tests.mipprune.conftest import randomize_batchnorms, run_cli
from tests.mipprune.pruning.blocks import BLOCKS

pytestmark = pytest.mark.usefixtures("one_thread")


class ResidualDepthwiseNet(nn.Module):
    """stem → [expand 1x1 → depthwise 3x3 → project 1x1] + skip (BN everywhere) → pool → Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(31)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(6, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.project = nn.Conv2d(12, 6, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)
        randomize_batchnorms(self, seed=31)
        # left at its initial state: weight == running_var == 1, bias == running_mean == 0, the values the
        # converter's parameter-vs-buffer test confuses
        self.project_bn.reset_parameters()

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.project_bn(self.project(self.dw(self.expand(x)))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DataDependentGate(nn.Module):
    """A forward that branches on a tensor's value: no static channel graph."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        if y.mean() > 0:
            y = torch.relu(y)
        return self.conv2(y)


class ItemGate(DataDependentGate):
    """The same through a Python float (``.item()``), and a branch on a shape that is fine."""

    def forward(self, x):
        y = self.bn(self.conv1(x))
        if y.size(1) == 4:
            y = y * 2.0
        scale = y.mean().item() * 2.0
        if scale > 0.0:
            y = torch.relu(y)
        return self.conv2(y)


def _save_torchscript(model: nn.Module, kind: str, path, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's TorchScript deprecation notice
        ts = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, (x,))
        ts.save(str(path))
    return path


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


@pytest.mark.parametrize("name,kind", [("resdw", "script"), ("resdw", "trace"), ("basic", "script")])
def test_torchscript_is_lifted_to_the_module_it_was_saved_from(name, kind, tmp_path):
    model = (ResidualDepthwiseNet() if name == "resdw" else BLOCKS[name]()).eval()
    path = _save_torchscript(model, kind, tmp_path / "m.pt", torch.randn(2, 3, 8, 8))
    assert detect_format(path) == "torchscript"
    lifted, fmt = load_model(path, example=torch.randn(2, 3, 8, 8))
    x = torch.randn(5, 3, 8, 8)  # another batch size than the converter's sample
    with torch.no_grad():
        assert fmt == "torchscript"
        torch.testing.assert_close(lifted(x), model(x), rtol=1e-5, atol=1e-6)
    # parameters stay parameters and statistics buffers, at their original names
    assert {n for n, _ in lifted.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert {n for n, b in model.named_buffers() if "running" in n} <= {n for n, _ in lifted.named_buffers()}
    convs = {n: m for n, m in lifted.named_modules() if isinstance(m, nn.Conv2d)}
    if name == "resdw":
        assert convs["dw.0"].groups == 12 and isinstance(lifted.get_submodule("head"), nn.Linear)


@pytest.mark.parametrize("kind,suffix", [("script", ".pt"), ("trace", ".pt"), ("script", ".pt2")])
def test_cli_prunes_torchscript_and_writes_torchscript_equal_to_the_pruned_module(kind, suffix, tmp_path, capsys):
    """``--out x.pt`` of a TorchScript model is TorchScript; ``x.pt2`` a torch.export archive, ``--onnx`` ONNX."""
    from mipprune.pruning.selector import ChannelSelector

    model = ResidualDepthwiseNet().eval()
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    path = _save_torchscript(model, kind, tmp_path / "m.pt", torch.from_numpy(x[:2]))
    data, out, js, onnx = tmp_path / "x.npy", tmp_path / f"pruned{suffix}", tmp_path / "run.json", tmp_path / "p.onnx"
    np.save(data, x)
    code, text, err = run_cli(["prune", "--model", str(path), "--data", str(data), "--method", "greedy",
                               "--sparsity", "0.5", "--out", str(out), "--json", str(js)]
                              + (["--onnx", str(onnx)] if suffix == ".pt2" else []), capsys)
    assert code == 0, err
    assert "(torchscript)" in text and "pruned model saved to" in text
    rec = json.loads(js.read_text())
    out_format = "torchscript" if suffix == ".pt" else "export"
    assert rec["format"] == "torchscript" and rec["saved"]["model_format"] == out_format
    assert rec["params"]["after"] < rec["params"]["before"]
    assert detect_format(out) == out_format
    saved = _jit_load(out) if suffix == ".pt" else torch.export.load(str(out)).module()
    # the same selection in process: the CLI holds out the first fifth and calibrates on the rest
    xt = torch.from_numpy(x)
    lifted, _ = load_model(path, example=xt[:2])
    pruned = ChannelSelector("greedy", sparsity=0.5, seed=0).fit(lifted, [xt[8:]]).prune(lifted)
    assert sum(p.numel() for p in pruned.parameters()) == rec["params"]["after"]
    z = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(saved(z), pruned(z), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(saved(z), model(z), rtol=1e-3)  # channels really went
    if suffix == ".pt2":
        import onnxruntime as ort

        y = ort.InferenceSession(str(onnx)).run(None, {"input": z.numpy()})[0]
        np.testing.assert_allclose(y, pruned(z).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_all_kept_torchscript_reproduces_the_dense_outputs(tmp_path, capsys):
    model = ResidualDepthwiseNet().eval()
    path = _save_torchscript(model, "script", tmp_path / "m.pt", torch.randn(2, 3, 8, 8))
    out = tmp_path / "kept.pt"
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8", "--method", "greedy",
                               "--flops", "1.0", "--out", str(out)], capsys)
    assert code == 0, err
    dense, kept = _jit_load(path), _jit_load(out)
    z = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        a, b = dense(z), kept(z)
    assert float((a - b).norm() / a.norm()) <= 1e-6
    assert sum(p.numel() for p in kept.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("gate,line", [(DataDependentGate, "`if y.mean() > 0:`"), (ItemGate, "`if scale > 0.0:`")])
def test_data_dependent_control_flow_is_refused_with_where_it_is(gate, line, tmp_path, capsys):
    path = _save_torchscript(gate().eval(), "script", tmp_path / "gate.pt", torch.randn(2, 3, 8, 8))
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "3,8,8"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "data-dependent control flow" in err and "gate.pt" in err
    assert "test_model_io_torchscript.py" in err and line in err and "y.size(1)" not in err
    assert "torch.save(model, FILE)" in err and "torch.jit.trace" in err


class LoopOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv1(x)
        for _ in range(y.size(1)):
            y = y + 1.0
        return self.conv2(y)


def test_converter_failures_and_unmapped_ops_are_refused_in_the_users_terms(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    loop = _save_torchscript(LoopOverChannels().eval(), "script", tmp_path / "loop.pt", x)
    with pytest.raises(UnsupportedLayerError, match=r"(?s)converter .*fails: RuntimeError: .*prim::Loop.*"
                                                    r"`for _ in range\(y.size\(1\)\):`.*torch.jit.trace unrolls"):
        load_model(loop, example=x)
    shuffle = _save_torchscript(BLOCKS["shuffle"]().eval(), "script", tmp_path / "shuffle.pt", x)
    with pytest.raises(UnsupportedLayerError, match=r"TorchScript shuffle.pt .*aten.view.default to the shape"):
        load_model(shuffle, example=x)
    upsample = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3)).eval()
    traced = _save_torchscript(upsample, "trace", tmp_path / "up.pt", x)
    with pytest.raises(UnsupportedLayerError, match="transposed convolution"):
        load_model(traced, example=x)


def test_spatial_guards_the_converter_cannot_solve_are_retried_with_the_batch_dimension_only(tmp_path):
    """AlexNet's pattern at 32x32: the converter's all-dynamic retrace fails in sympy on the classifier's
    fixed input size; the retry with fixed spatial sizes converts it."""
    from torch._export.converter import TS2EPConverter

    torch.manual_seed(32)
    model = nn.Sequential(nn.Conv2d(3, 4, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                          nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(3),
                          nn.Flatten(), nn.Linear(6 * 9, 3)).eval()
    x = torch.randn(2, 3, 32, 32)
    path = _save_torchscript(model, "trace", tmp_path / "alex.pt", x)
    with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="cannot be solved"):
        warnings.simplefilter("ignore")
        TS2EPConverter(_jit_load(path), (x,)).convert()
    lifted, _ = load_model(path, example=x)
    z = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lifted(z), model(z), rtol=1e-5, atol=1e-6)


def test_torchscript_needs_an_input_shape_it_accepts(tmp_path, capsys):
    path = _save_torchscript(ResidualDepthwiseNet().eval(), "trace", tmp_path / "m.pt", torch.randn(2, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="--input-shape .* must be given with a TorchScript"):
        load_model(path)
    code, text, err = run_cli(["prune", "--model", str(path), "--input-shape", "5,8,8"], capsys)
    assert code == 2 and "--input-shape must be the per-sample shape m.pt takes" in err and "(2, 5, 8, 8)" in err
