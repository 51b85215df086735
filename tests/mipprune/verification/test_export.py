"""torch → numpy IR: forwards agree in float64 (eval mode), BatchNorm is folded, the model is left
untouched, unsupported modules are named; plus torch ONNX exports read back by ``Network.from_onnx``."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mipprune.verification.export import to_network
from solvers.errors import InvalidInputError, UnsupportedLayerError
from solvers.network.layers import Add, Conv2d, Dense, Flatten, Normalize, ReLU
from solvers.network.ir import Network


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


def _torch_forward(model, x: np.ndarray) -> np.ndarray:
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(torch.from_numpy(x)).reshape(x.shape[0], -1).numpy()


def _compare(model, input_shape, n=6, seed=0):
    net = to_network(model, input_shape)
    x = np.random.default_rng(seed).uniform(-1, 1, size=(n,) + tuple(np.atleast_1d(input_shape)))
    np.testing.assert_allclose(net.forward(x), _torch_forward(model, x), rtol=1e-6, atol=1e-6)
    return net


def test_mlp_with_batchnorm_and_dropout_matches_torch_and_folds_batchnorm():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Identity()),
                                        nn.Linear(8, 3)))
    model.train()        # the export uses running statistics regardless of the mode
    net = _compare(model, 12)
    assert [type(l) for l in net.layers] == [Dense, ReLU, Dense, ReLU, Dense]


def test_cnn_with_strides_padding_dilation_and_batchnorm2d_matches_torch():
    torch.manual_seed(1)
    model = _randomize_bn(nn.Sequential(
        nn.BatchNorm2d(2),                                    # leading BN: becomes a Normalize layer
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding="same", dilation=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), seed=2).eval()
    net = _compare(model, (2, 8, 8))
    assert [type(l) for l in net.layers] == [Normalize, Conv2d, ReLU, Conv2d, ReLU, Flatten, Dense]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.fc1(torch.flatten(x, 1)))
        h = torch.relu(self.fc2(h) + h)
        return self.head(h)


def test_traced_module_with_functional_relu_flatten_and_residual_add():
    torch.manual_seed(2)
    net = _compare(_Residual(), (2, 3))
    assert any(isinstance(l, Add) for l in net.layers)


def test_export_does_not_modify_the_model():
    torch.manual_seed(3)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(2 * 4 * 4, 3)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_network(model, (1, 6, 6))
    after = model.state_dict()
    assert model.training and all(torch.equal(before[k], after[k]) for k in before)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), r"module '1' has type Sigmoid"),
    (nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Tanh())), r"module '1.0' has type Tanh"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "groups=1"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), "zero padding"),
])
def test_unsupported_modules_are_named(model, match):
    shape = (4,) if isinstance(model[0], nn.Linear) or isinstance(model[0], nn.Sequential) else (2, 5, 5)
    with pytest.raises(UnsupportedLayerError, match=match):
        to_network(model, shape)


def test_untraceable_or_unsupported_functional_ops_and_bad_shapes_raise():
    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    with pytest.raises(UnsupportedLayerError, match="operation 'sigmoid'"):
        to_network(Sig(), 3)
    with pytest.raises(InvalidInputError, match="input_shape must be positive"):
        to_network(nn.Sequential(nn.Linear(3, 2)), (0,))
    with pytest.raises(InvalidInputError, match=r"expects input shape \(3,\)"):
        to_network(nn.Sequential(nn.Linear(3, 2)), 5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_onnx_export_reads_back_with_the_same_forward(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(4)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.ReLU(),
                                        nn.Linear(10, 4))).eval()
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}})
    net = Network.from_onnx(path)
    x = np.random.default_rng(0).uniform(size=(5, 1, 8, 8))
    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-5)        # torch runs in float32
    # the exporter folds BatchNorm itself and stores float32 weights: agreement to float32 round-off
    np.testing.assert_allclose(net.forward(x), to_network(model, (1, 8, 8)).forward(x), atol=1e-6)


@pytest.mark.parametrize("folded", [True, False])
def test_batchnorm_with_nan_running_var_is_refused(folded):
    # regression: the folded weights were assigned onto the Dense layer after its finiteness check
    torch.manual_seed(5)
    layers = [nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)]
    model = nn.Sequential(*(layers if folded else [nn.BatchNorm1d(4)] + layers[2:]))
    bn = next(m for m in model if isinstance(m, nn.BatchNorm1d))
    bn.running_var[1] = float("nan")
    name = "1" if folded else "0"
    match = rf"module '{name}' \(BatchNorm1d\) scale .*must be finite; got 1 NaN/inf"
    with pytest.raises(InvalidInputError, match=match):
        to_network(model.eval(), 4)


def test_linear_weights_overflowing_when_batchnorm_is_folded_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double()
    with torch.no_grad():
        model[0].weight.fill_(1e300)
        model[1].weight.fill_(1e300)
    with np.errstate(over="ignore"):
        with pytest.raises(InvalidInputError, match=r"layer 0 \(Dense '0'\) weight must be finite; got 4 NaN/inf "
                                                    r"entries \(after folding module '1' \(BatchNorm1d\) into it\)"):
            to_network(model.eval(), 2)
