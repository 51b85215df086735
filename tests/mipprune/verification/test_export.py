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


class _ResBlock(nn.Module):
    """torchvision's BasicBlock: identity shortcut, or a strided 1×1 conv + BatchNorm one."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)
        self.conv2, self.relu = nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))) + identity)


class _TinyResNet(nn.Module):
    """stem → MaxPool → residual block → downsampling residual block → AvgPool → global average pool →
    fc (ResNet's pattern)."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.block1, self.block2 = _ResBlock(4, 4), _ResBlock(4, 6, stride=2)
        self.avg, self.gap = nn.AvgPool2d(2, 1), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.block2(self.block1(self.pool(self.relu(self.stem(x)))))
        return self.fc(torch.flatten(self.gap(self.avg(x)), 1))


def test_resnet_style_pooling_net_round_trips_through_onnx_and_verifies(tmp_path):
    import warnings

    import mipprune
    from solvers.network.layers import AvgPool2d, Branch, MaxPool2d
    from solvers.network.spec import Spec
    from solvers.result import Verdict

    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _randomize_bn(_TinyResNet()).eval()
    path = tmp_path / "resnet.onnx"
    with warnings.catch_warnings():
        # the TorchScript exporter (dynamo=False: the dynamo one warns too, and takes 10 s) announces
        # its own deprecation; nothing else may warn
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"])
    net = Network.from_onnx(path)
    kinds = [type(layer) for layer in net.layers]
    assert kinds.count(Add) == 2 and Branch in kinds and MaxPool2d in kinds and AvgPool2d in kinds
    x = np.random.default_rng(0).uniform(size=(5, 1, 8, 8))
    ref = _torch_forward(model, x)
    np.testing.assert_allclose(net.forward(x), ref, atol=1e-5)          # float32 weights in the file
    np.testing.assert_allclose(to_network(model, (1, 8, 8)).forward(x), ref, atol=1e-10)

    c = x[0].reshape(-1)
    label = int(np.argmax(net.forward(c)))
    others = [j for j in range(3) if j != label]
    A = [np.eye(3)[label] - np.eye(3)[j] for j in others]
    disjuncts = tuple((a[None, :], np.zeros(1)) for a in A)       # unsafe: another class scores as high
    proven = mipprune.verify(net, Spec(c - 0.05, c + 0.05, disjuncts), time_limit=30)
    assert proven.verdict == Verdict.VERIFIED
    # over the whole [0, 1] box the margin to the runner-up class drops below a level that a third
    # of random inputs reach: falsified, with a counterexample re-checked in float64
    a = A[0]
    level = float(np.quantile(net.forward(np.random.default_rng(1).uniform(size=(300, 64))) @ a, 0.3))
    found = mipprune.verify(net, Spec(np.zeros(64), np.ones(64), ((a[None, :], np.array([level])),)),
                            time_limit=30)
    assert found.verdict == Verdict.FALSIFIED
    cex = found.counterexample
    assert np.all(cex >= 0) and np.all(cex <= 1) and a @ net.forward(cex) <= level
    y_torch = _torch_forward(model, cex.reshape(1, 1, 8, 8))[0]          # and by the torch model itself
    assert a @ y_torch <= level + 1e-9


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1, dilation=2),
                                  nn.MaxPool2d(2, 2, ceil_mode=True), nn.AvgPool2d(3, 2, 1),
                                  nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AdaptiveAvgPool2d(1),
                                  nn.AdaptiveAvgPool2d((2, 3))])
def test_pooling_modules_match_torch(pool):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), pool, nn.ReLU(), nn.Flatten()).eval()
    _compare(model, (2, 6, 6))


@pytest.mark.parametrize("pool,match", [(nn.MaxPool2d(2, 2, ceil_mode=True), "ceil_mode=True changes"),
                                        (nn.MaxPool2d(2, return_indices=True), "return_indices=False"),
                                        (nn.AvgPool2d(2, divisor_override=3), "divisor_override=None"),
                                        (nn.AdaptiveAvgPool2d(4), "must divide the input size")])
def test_pooling_variants_the_ir_cannot_express_are_named(pool, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        to_network(nn.Sequential(nn.Conv2d(1, 2, 3), pool), (1, 7, 7))


class _FunctionalPools(nn.Module):
    """Pooling through torch.nn.functional in forward (as many CIFAR ResNets write it)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2, padding=1)
        x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


def test_functional_pooling_in_a_traced_forward_matches_torch():
    torch.manual_seed(7)
    model = _FunctionalPools().eval()
    _compare(model, (1, 6, 6))
    net = to_network(model, (1, 6, 6))
    assert [type(layer).__name__ for layer in net.layers].count("MaxPool2d") == 1


def test_view_by_another_size_than_the_batch_is_refused():
    class _Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.view(x.size(1), -1))

    with pytest.raises(UnsupportedLayerError, match="must flatten all but the batch"):
        to_network(_Odd(), (4,))
