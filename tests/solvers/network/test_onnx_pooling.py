"""ONNX MaxPool / AveragePool / GlobalAveragePool import: the float64 forward matches onnxruntime for
kernel, stride, pads, dilations and count_include_pad; variants the IR cannot express are refused."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

from solvers.errors import InvalidInputError, UnsupportedLayerError  # noqa: E402
from solvers.network.ir import Network  # noqa: E402
from solvers.network.layers import AvgPool2d, MaxPool2d  # noqa: E402
from tests.solvers.network.test_onnx import _check_against_ort, _init, _model  # noqa: E402


def _out_hw(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [1, 0, 1, 0], "dilations": [2, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [2, 2]}),
])
def test_pooling_after_a_conv_matches_onnxruntime(tmp_path, op, attrs):
    rng = np.random.default_rng(0)
    k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1])
    p, d = attrs.get("pads", [0, 0, 0, 0]), attrs.get("dilations", [1, 1])
    oh, ow = _out_hw(7, k[0], s[0], p[0], d[0]), _out_hw(7, k[1], s[1], p[1], d[1])
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["y"], name="pool", **attrs)]
    # the conv's output is signed (negative entries meet the padding of the max pool)
    path = _model(nodes, [_init("W", rng.normal(size=(3, 2, 3, 3))), _init("B", rng.normal(size=3))],
                  [1, 2, 7, 7], [1, 3, oh, ow], tmp_path / "pool.onnx")
    net = _check_against_ort(path, (1, 2, 7, 7))
    assert isinstance(net.layers[-1], MaxPool2d if op == "MaxPool" else AvgPool2d)
    assert net.output_shape == (3, oh, ow)


def test_global_average_pool_then_gemm_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="fc", transB=1)]
    path = _model(nodes, [_init("W", rng.normal(size=(2, 3)))], [1, 3, 5, 4], [1, 2], tmp_path / "gap.onnx")
    net = _check_against_ort(path, (1, 3, 5, 4))
    assert any(isinstance(layer, AvgPool2d) and layer.kernel == (5, 4) for layer in net.layers)


@pytest.mark.parametrize("attrs,match,err", [
    ({"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}, "pads must be symmetric", UnsupportedLayerError),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, "ceil_mode=1 changes the output shape",
     UnsupportedLayerError),
    ({"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}, "auto_pad=SAME_UPPER", UnsupportedLayerError),
    ({"kernel_shape": [2]}, r"expects a \(C, H, W\) input", UnsupportedLayerError),
])
def test_pooling_variants_the_ir_cannot_express_are_refused(tmp_path, attrs, match, err):
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="mp", **attrs)]
    in_shape = [1, 1, 5] if len(attrs["kernel_shape"]) == 1 else [1, 1, 5, 5]
    path = _model(nodes, [], in_shape, [1] * len(in_shape), tmp_path / "bad.onnx")
    with pytest.raises(err, match=match):
        Network.from_onnx(path)


def test_ceil_mode_that_changes_nothing_is_accepted(tmp_path):
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)]
    path = _model(nodes, [], [1, 1, 6, 6], [1, 1, 3, 3], tmp_path / "ceil.onnx")
    _check_against_ort(path, (1, 1, 6, 6))


def test_pool_layers_check_their_arguments():
    with pytest.raises(InvalidInputError, match="padding must be at most half"):
        MaxPool2d(2, 2, 2)
    with pytest.raises(InvalidInputError, match="must be >= 1"):
        AvgPool2d(0)
    with pytest.raises(InvalidInputError, match=r"expects input shape \(C, H, W\)"):
        Network([MaxPool2d(2)], (4,))
    with pytest.raises(InvalidInputError, match="output would be empty"):
        Network([MaxPool2d(3)], (1, 2, 2))


def test_shortcut_with_its_own_conv_becomes_a_branch_and_matches_onnxruntime(tmp_path):
    # x → conv a → relu → conv b ┐
    # x → 1×1 conv s ────────────┴ Add → relu   (ResNet's downsampling block; s is computed last)
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], name="a", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "Wb"], ["b"], name="b", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "Ws"], ["s"], name="s", strides=[2, 2]),
             helper.make_node("Add", ["b", "s"], ["sum"], name="add"),
             helper.make_node("Relu", ["sum"], ["y"], name="out")]
    inits = [_init("Wa", rng.normal(size=(3, 2, 3, 3))), _init("Wb", rng.normal(size=(3, 3, 3, 3))),
             _init("Ws", rng.normal(size=(3, 2, 1, 1)))]
    path = _model(nodes, inits, [1, 2, 6, 6], [1, 3, 3, 3], tmp_path / "shortcut.onnx")
    net = _check_against_ort(path, (1, 2, 6, 6))
    assert [type(layer).__name__ for layer in net.layers] == ["Conv2d", "ReLU", "Conv2d", "Branch", "Conv2d",
                                                              "Add", "ReLU"]
    blocks = net.to_affine_relu()      # the shortcut is a skip from the input into the second block
    assert [k for k, _ in blocks[1].skips] == [0]
