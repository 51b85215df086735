"""The numpy network IR: shapes, conv forward against a direct loop, affine/ReLU folding."""
from __future__ import annotations

import numpy as np
import pytest

from solvers.errors import InvalidInputError
from solvers.network.layers import Add, Conv2d, Dense, Flatten, Normalize, ReLU
from solvers.network.ir import Network, forward_blocks


def _conv_loop(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for p in range(oh):
        for q in range(ow):
            patch = xp[:, :, p * stride:p * stride + kh, q * stride:q * stride + kw]
            out[:, :, p, q] = np.einsum("ncij,ocij->no", patch, w) + b
    return out


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1), (1, 1)])
def test_conv_forward_and_matrix_match_a_direct_loop(stride, pad):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    x = rng.normal(size=(2, 3, 7, 6))
    conv = Conv2d(w, b, stride=stride, padding=pad)
    ref = _conv_loop(x, w, b, stride, pad)
    np.testing.assert_allclose(conv.forward(x), ref, atol=1e-12)
    M, bias = conv.as_matrix((3, 7, 6))
    np.testing.assert_allclose(x.reshape(2, -1) @ M.T.toarray() + bias, ref.reshape(2, -1), atol=1e-12)


def test_affine_relu_form_reproduces_forward():
    rng = np.random.default_rng(1)
    net = Network([Normalize(np.array(0.1), np.array(0.3)), Conv2d(rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2)),
                   ReLU(), Flatten(), Dense(rng.normal(size=(5, 2 * 4 * 4)), rng.normal(size=5)), ReLU(),
                   Dense(rng.normal(size=(3, 5)), rng.normal(size=3))], input_shape=(1, 6, 6))
    x = rng.uniform(size=(4, 1, 6, 6))
    blocks = net.to_affine_relu()
    assert len(blocks) == 3
    h = x.reshape(4, -1)
    for i, blk in enumerate(blocks):
        h = h @ blk.weight.T.toarray() + blk.bias
        if i < len(blocks) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(h, net.forward(x), atol=1e-10)
    assert net.forward(x[0]).shape == (3,)


def test_network_errors_are_clear():
    with pytest.raises(InvalidInputError, match=r"expects input shape \(4,\)"):
        Network([Dense(np.ones((2, 4)))], input_shape=(3,))
    with pytest.raises(InvalidInputError, match="finite"):
        Dense(np.array([[np.nan]]))
    net = Network([Dense(np.eye(2)), ReLU(), Add(source=1)], input_shape=(2,))
    np.testing.assert_allclose(net.forward(np.array([1.0, -1.0])), [2.0, -1.0])
    blocks = net.to_affine_relu()   # the residual operand (pre-ReLU) becomes a skip from the input
    assert [k for k, _ in blocks[-1].skips] == [0]
    np.testing.assert_allclose(forward_blocks(blocks, np.array([[1.0, -1.0]])), [[2.0, -1.0]])
    with pytest.raises(InvalidInputError, match="input must have shape"):
        net.forward(np.ones(5))


def test_non_finite_arrays_are_refused_when_the_network_is_assembled():
    # arrays assigned after a layer's constructor (as weight folding does) are checked by Network
    fc = Dense(np.eye(2))
    fc.weight = np.array([[1.0, np.nan], [np.inf, 0.0]])
    with pytest.raises(InvalidInputError, match=r"layer 2 \(Dense 'fc2'\) weight must be finite; got 2 NaN/inf"):
        Network([Dense(np.eye(2)), ReLU(), fc], input_shape=(2,), names=["fc1", "relu", "fc2"])
    norm = Normalize(np.zeros(2), np.ones(2))
    norm.std = np.array([1.0, 0.0])
    with pytest.raises(InvalidInputError, match=r"layer 0 \(Normalize 'normalize_0'\) std must be non-zero"):
        Network([norm], input_shape=(2,))
    conv = Conv2d(np.ones((1, 1, 2, 2)))
    conv.bias = np.array([np.nan])
    with pytest.raises(InvalidInputError, match=r"layer 0 \(Conv2d 'conv2d_0'\) bias must be finite; got 1"):
        Network([conv], input_shape=(1, 3, 3))


def test_blocks_keep_the_geometry_of_a_convolution_only_where_it_is_the_whole_weight():
    """``AffineBlock.conv`` names the convolution whose matrix is the block's weight: a conv straight on the
    input or on a ReLU output; not after a layer folded into it (Normalize, AvgPool), nor with a residual Add."""
    from solvers.network.layers import AvgPool2d

    rng = np.random.default_rng(0)
    conv = lambda cin, cout, **kw: Conv2d(rng.normal(size=(cout, cin, 3, 3)), rng.normal(size=cout), **kw)  # noqa: E731
    net = Network([conv(1, 2, padding=1), ReLU(), conv(2, 2, stride=2, padding=1), ReLU(),
                   AvgPool2d((2, 2)), conv(2, 3, padding=1), ReLU(), conv(3, 3, padding=1), Add(source=6), ReLU(),
                   Flatten(), Dense(rng.normal(size=(4, 12)))], (1, 8, 8))
    blocks = net.to_affine_relu()
    assert [b.conv is not None for b in blocks] == [True, True, False, False, False]
    for blk, layer, shape in ((blocks[0], net.layers[0], (1, 8, 8)), (blocks[1], net.layers[2], (2, 8, 8))):
        g = blk.conv
        assert (g.in_shape, g.out_shape) == (shape, layer.output_shape(shape))
        assert (g.stride, g.padding) == (layer.stride, layer.padding)
        assert np.array_equal(layer.as_matrix(shape)[0].toarray(), blk.weight.toarray())
        g.kernel[...] = 0.0   # its own copy: the layer's weights are untouched
        assert np.any(layer.weight != 0)
    normalized = Network([Normalize(np.array(0.1), np.array(0.3)), conv(1, 2, padding=1), ReLU(), Flatten(),
                          Dense(rng.normal(size=(1, 128)))], (1, 8, 8))
    assert [b.conv is None for b in normalized.to_affine_relu()] == [True, True]
