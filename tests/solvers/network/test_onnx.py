"""ONNX import: the float64 forward matches onnxruntime; folding (MatMul+Add, BatchNorm, Sub/Div) leaves
no extra layers; anything else is refused with the node and op named. ONNX models are built with
``onnx.helper`` (no torch under tests/solvers)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from solvers.errors import InvalidInputError, UnsupportedLayerError  # noqa: E402
from solvers.network.layers import Add, Conv2d, Dense, Flatten, Normalize, ReLU  # noqa: E402
from solvers.network.ir import Network  # noqa: E402


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inits, in_shape, out_shape, path, opset=13):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def _check_against_ort(path, in_shape, seed=0, n=5):
    net = Network.from_onnx(path)
    rng = np.random.default_rng(seed)
    xs = rng.uniform(size=(n,) + tuple(in_shape[1:])).astype(np.float32)
    ref = np.concatenate([_ort(path, x[None]) for x in xs]).reshape(n, -1)
    got = net.forward(xs.reshape(n, -1).astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    return net


@pytest.mark.parametrize("depth", [2, 4, 6])
def test_shared_mnist_networks_match_onnxruntime(shared_bench, depth):
    path = shared_bench / "onnx" / f"mnist-net_256x{depth}.onnx"
    net = _check_against_ort(path, (1, 784, 1))
    # declared input 1×784×1 is read as 784 flat inputs (matching X_0 … X_783 of the properties)
    assert net.input_shape == (784,) and net.n_outputs == 10
    assert sum(isinstance(l, Dense) for l in net.layers) == depth + 1
    assert sum(isinstance(l, ReLU) for l in net.layers) == depth


def test_matmul_add_and_input_normalization_are_fused(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "std"], ["b"], name="div"),
             helper.make_node("MatMul", ["b", "W1"], ["c"], name="mm1"),
             helper.make_node("Add", ["c", "b1"], ["d"], name="add1"),
             helper.make_node("Relu", ["d"], ["e"], name="relu"),
             helper.make_node("MatMul", ["e", "W2"], ["f"], name="mm2"),
             helper.make_node("Add", ["b2", "f"], ["g"], name="add2"),   # constant first
             helper.make_node("Mul", ["g", "two"], ["y"], name="mul")]
    inits = [_init("mean", rng.uniform(size=(1, 6))), _init("std", rng.uniform(0.5, 1.5, size=6)),
             _init("W1", rng.normal(size=(6, 8))), _init("b1", rng.normal(size=8)),
             _init("W2", rng.normal(size=(8, 3))), _init("b2", rng.normal(size=3)), _init("two", [2.0])]
    path = _model(nodes, inits, [1, 6], [1, 3], tmp_path / "mlp.onnx")
    net = _check_against_ort(path, (1, 6))
    assert [type(l) for l in net.layers] == [Normalize, Dense, ReLU, Dense]


def test_conv_batchnorm_gemm_network_matches_and_folds_batchnorm(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1],
                              strides=[2, 2], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mu", "var"], ["bn"], name="bn",
                              epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "Wc2"], ["c2"], name="conv2", dilations=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=0)]
    inits = [_init("Wc", rng.normal(size=(3, 2, 3, 3))), _init("bc", rng.normal(size=3)),
             _init("g", rng.uniform(0.5, 2, 3)), _init("beta", rng.normal(size=3)),
             _init("mu", rng.normal(size=3)), _init("var", rng.uniform(0.5, 2, 3)),
             _init("Wc2", rng.normal(size=(4, 3, 2, 2))),
             _init("Wg", rng.normal(size=(4 * 2 * 2, 5))), _init("bg", rng.normal(size=(1, 5)))]
    path = _model(nodes, inits, [1, 2, 8, 8], [1, 5], tmp_path / "cnn.onnx")
    net = _check_against_ort(path, (1, 2, 8, 8))
    assert net.input_shape == (2, 8, 8)
    assert [type(l) for l in net.layers] == [Conv2d, ReLU, Conv2d, ReLU, Flatten, Dense]


def test_dynamic_reshape_chain_is_constant_folded_and_input_reshape_reinterprets(tmp_path):
    rng = np.random.default_rng(2)
    shape_nodes = [helper.make_node("Shape", ["r"], ["s"], name="shape"),
                   helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
                   helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
                   helper.make_node("Concat", ["n1", "minus1"], ["tgt"], name="cat", axis=0)]
    nodes = [helper.make_node("Reshape", ["x", "img"], ["xi"], name="to_img"),
             helper.make_node("Conv", ["xi", "Wc"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             *shape_nodes,
             helper.make_node("Reshape", ["r", "tgt"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "Wg"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(np.array([1, 1, 5, 5], dtype=np.int64), "img"),
             _init("Wc", rng.normal(size=(2, 1, 2, 2))),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1"),
             _init("Wg", rng.normal(size=(3, 2 * 4 * 4)))]
    path = _model(nodes, inits, [1, 25], [1, 3], tmp_path / "reshape.onnx")
    net = _check_against_ort(path, (1, 25))
    assert net.input_shape == (1, 5, 5)


def test_residual_add_of_two_activations_becomes_an_add_layer(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "W2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Add", ["h2", "r"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    inits = [_init("W1", rng.normal(size=(4, 3))), _init("b1", rng.normal(size=4)),
             _init("W2", rng.normal(size=(4, 4)))]
    path = _model(nodes, inits, ["N", 3], ["N", 4], tmp_path / "res.onnx")
    net = _check_against_ort(path, (1, 3))
    assert any(isinstance(l, Add) for l in net.layers)


def test_constant_shift_is_not_folded_into_a_layer_whose_output_is_read_again(tmp_path):
    # h feeds (through an Identity alias) a shifted branch and, later, a residual Add: folding the
    # shift into fc1 would corrupt the skip connection
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("Identity", ["h"], ["h_alias"], name="id"),
             helper.make_node("Add", ["h_alias", "c"], ["s"], name="shift"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["t"], name="fc2", transB=1),
             helper.make_node("Add", ["t", "h"], ["y"], name="skip")]
    inits = [_init("W1", rng.normal(size=(4, 3))), _init("c", rng.normal(size=4)), _init("W2", rng.normal(size=(4, 4)))]
    path = _model(nodes, inits, [1, 3], [1, 4], tmp_path / "alias.onnx")
    net = _check_against_ort(path, (1, 3))
    assert [type(l) for l in net.layers] == [Dense, Normalize, ReLU, Dense, Add]


def test_unsupported_operator_is_named_with_its_node(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
             helper.make_node("Sigmoid", ["h"], ["y"], name="squash")]
    path = _model(nodes, [_init("W", np.ones((2, 2)))], [1, 2], [1, 2], tmp_path / "sig.onnx")
    with pytest.raises(UnsupportedLayerError, match=r"node 'squash' has op 'Sigmoid': only ReLU networks"):
        Network.from_onnx(path)


@pytest.mark.parametrize("attrs,match", [({"group": 2}, "group must be 1"),
                                         ({"pads": [0, 0, 1, 1]}, "pads must be symmetric")])
def test_unsupported_conv_variants_are_refused(tmp_path, attrs, match):
    w = np.ones((2, 1 if attrs.get("group") else 2, 2, 2))
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)]
    out = [1, 2, 4, 4] if "pads" in attrs else [1, 2, 3, 3]
    path = _model(nodes, [_init("W", w)], [1, 2, 4, 4], out, tmp_path / "conv.onnx")
    with pytest.raises(UnsupportedLayerError, match=match):
        Network.from_onnx(path)


def test_missing_and_malformed_files_raise_invalid_input(tmp_path):
    with pytest.raises(InvalidInputError, match="ONNX file must exist"):
        Network.from_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe")
    with pytest.raises(InvalidInputError, match="must be a valid ONNX model"):
        Network.from_onnx(bad)


def _mlp_then(node, inits, path, rng):
    """Gemm → Relu → Gemm (3 → 4 → 2), then ``node`` (reading 'z', writing 'y')."""
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["z"], name="fc2", transB=1), node]
    inits = [_init("W1", rng.normal(size=(4, 3))), _init("b1", rng.normal(size=4)),
             _init("W2", rng.normal(size=(2, 4))), _init("b2", rng.normal(size=2))] + inits
    return _model(nodes, inits, [1, 3], [1, 2], path)


@pytest.mark.parametrize("op", ["Mul", "Div", "Add", "Sub"])
def test_nan_constant_folded_into_a_gemm_is_refused_at_load_time(tmp_path, op):
    # regression: the folded weights were assigned onto the Dense layer after its finiteness check,
    # so the model loaded and verify() later spun inside HiGHS on NaN costs
    rng = np.random.default_rng(7)
    path = _mlp_then(helper.make_node(op, ["z", "c"], ["y"], name="scale"),
                     [_init("c", [1.5, np.nan])], tmp_path / "nan_mul.onnx", rng)
    with pytest.raises(InvalidInputError, match=rf"node 'scale' \({op}\).*must be finite; got 1 NaN/inf entries"):
        Network.from_onnx(path)


@pytest.mark.parametrize("var,match", [([1.0, np.nan], r"its var \('var'\) must be finite"),
                                       ([1.0, -2.0], "its scale must be finite")])   # sqrt of a negative
def test_batchnorm_with_nan_or_negative_variance_is_refused_at_load_time(tmp_path, var, match):
    rng = np.random.default_rng(8)
    bn = helper.make_node("BatchNormalization", ["z", "g", "beta", "mu", "var"], ["y"], name="bn")
    inits = [_init("g", [1.0, 2.0]), _init("beta", [0.0, 0.5]), _init("mu", [0.1, -0.1]), _init("var", var)]
    path = _mlp_then(bn, inits, tmp_path / "nan_bn.onnx", rng)
    with np.errstate(invalid="ignore"):
        with pytest.raises(InvalidInputError, match=r"node 'bn' \(BatchNormalization\): " + match):
            Network.from_onnx(path)


def test_nan_gemm_weight_is_refused_naming_the_node(tmp_path):
    rng = np.random.default_rng(9)
    w2 = rng.normal(size=(2, 2))
    w2[1, 0] = np.inf
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)]
    path = _model(nodes, [_init("W1", rng.normal(size=(2, 2))), _init("W2", w2)], [1, 2], [1, 2],
                  tmp_path / "inf_w.onnx")
    with pytest.raises(InvalidInputError, match=r"node 'fc2' \(Gemm\): its weight B \('W2'\) must be finite"):
        Network.from_onnx(path)
