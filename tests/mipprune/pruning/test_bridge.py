"""The activation bridge: streaming Gram statistics equal the materialized ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose
from torch import nn

from mipprune.pruning.bridge import LayerStatistics, capture, sample_conv_rows
from solvers import SelectionProblem
from solvers.errors import InvalidInputError, UnsupportedLayerError
from tests.mipprune.conftest import batches, conv_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _materialized_conv(model: nn.Sequential, index: int, xs, target: nn.Sequential | None = None):
    """Z (all positions) and Y (output − bias) of conv ``model[index]``, built with F.unfold."""
    conv = model[index]
    zs, ys = [], []
    with torch.no_grad():
        for x in xs:
            inp = model[:index].eval()(x) if index else x
            out = (target if target is not None else model)[: index + 1].eval()(x)
            inp = F.pad(inp, conv._reversed_padding_repeated_twice)
            z = F.unfold(inp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            zs.append(z.transpose(1, 2).reshape(-1, z.shape[1]).double())
            ys.append((out.double() - conv.bias.double()[:, None, None]).permute(0, 2, 3, 1).reshape(-1, out.shape[1]))
    return torch.cat(zs).numpy(), torch.cat(ys).numpy()


def _close(a, b, rel=1e-9):
    assert_allclose(a, b, rtol=rel, atol=rel * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("index", [0, 3])
def test_streaming_gram_over_batches_equals_materialized_activations(conv_model, index):
    xs = batches((3, 3, 8, 8), 4)
    name = str(index)
    stats = capture(conv_model, xs, [name], positions=None)[name]
    Z, Y = _materialized_conv(conv_model, index, xs)
    _close(stats.gram, Z.T @ Z)
    _close(stats.cross, Z.T @ Y)
    _close(stats.target_sq, float(np.sum(Y * Y)))
    assert stats.n_samples == Z.shape[0]


def test_wide_grams_accumulate_by_row_blocks_without_syrk(conv_model, monkeypatch):
    # past _SYRK_MAX_COLUMNS the Gram is accumulated by GEMM row blocks (OpenBLAS SYRK crash): same Gram
    import mipprune.pruning.bridge as bridge

    monkeypatch.setattr(bridge, "_SYRK_MAX_COLUMNS", 4)
    monkeypatch.setattr(bridge, "_ROWS", 7)
    xs = batches((3, 3, 8, 8), 4)
    stats = capture(conv_model, xs, ["3"], positions=None)["3"]
    Z, Y = _materialized_conv(conv_model, 3, xs)
    _close(stats.gram, Z.T @ Z)
    _close(stats.cross, Z.T @ Y)


def test_streaming_with_sampling_equals_one_big_batch_with_the_same_positions(conv_model):
    xs = batches((2, 3, 8, 8), 3)
    # positions are drawn per image, in order, from one seeded generator per layer: three batches
    # of two images draw exactly what one batch of six does
    a = capture(conv_model, xs, ["3"], positions=5, seed=7)["3"]
    b = capture(conv_model, [torch.cat(xs)], ["3"], positions=5, seed=7)["3"]
    assert a.n_samples == b.n_samples == 6 * 5
    _close(a.gram, b.gram)
    _close(a.cross, b.cross, rel=1e-6)  # float32 conv outputs of a batch of 2 vs 6 may differ in ulps
    _close(a.cross, a.gram @ a.weights, rel=1e-5)  # Y = Z W at the sampled positions
    c = capture(conv_model, xs, ["3"], positions=5, seed=7)["3"]
    np.testing.assert_array_equal(a.gram, c.gram)
    d = capture(conv_model, xs, ["3"], positions=5, seed=8)["3"]
    assert not np.allclose(a.gram, d.gram)


CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "stride-pad": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "dilation": dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding=2),
    "rect": dict(in_channels=2, out_channels=3, kernel_size=(3, 1), padding=(1, 0)),
    "same": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "reflect": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("config", list(CONVS))
def test_sampled_patches_times_weights_reproduce_conv_outputs(config):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[config]).double()
    x = torch.randn(3, conv.in_channels, 9, 8, dtype=torch.float64)
    out = conv(x).detach()
    W = conv.weight.detach().reshape(conv.out_channels, -1).T
    gen = torch.Generator().manual_seed(0)
    Z, (img, oy, ox) = sample_conv_rows(conv, x, positions=6, generator=gen)
    assert Z.shape == (18, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    # six distinct positions per image
    assert len({(int(i), int(r), int(c)) for i, r, c in zip(img, oy, ox)}) == 18
    expected = out[img, :, oy, ox] - conv.bias.detach()
    torch.testing.assert_close(Z @ W, expected, rtol=1e-10, atol=1e-10)
    Zall, index = sample_conv_rows(conv, x, positions=None)
    assert index is None
    Yall = (out - conv.bias.detach()[:, None, None]).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(Zall @ W, Yall)


def test_sampled_conv_statistics_satisfy_cross_equals_gram_times_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, dilation=2, padding="same"))
    for s in capture(model, batches((2, 2, 9, 9), 2), positions=4).values():
        _close(s.cross, s.gram @ s.weights, rel=1e-5)
        _close(s.target_sq, float(np.sum(s.weights * (s.gram @ s.weights))), rel=1e-5)


@pytest.mark.parametrize("shape", [(7, 6), (3, 4, 6)])
def test_linear_gram_is_input_gram_with_leading_dims_flattened(shape):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 5))
    xs = batches(shape, 3)
    s = capture(lin, xs)["0"]
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double().numpy()
    Y = torch.cat([(lin(x) - lin[0].bias).detach().reshape(-1, 5) for x in xs]).double().numpy()
    _close(s.gram, X.T @ X)
    _close(s.cross, X.T @ Y, rel=1e-6)  # Y is float32 output minus bias
    assert s.n_samples == X.shape[0]
    np.testing.assert_array_equal(s.groups, np.arange(6))


def test_target_outputs_give_y_while_z_comes_from_the_model(conv_model):
    target = conv_net()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    xs = batches((2, 3, 8, 8), 3)
    s = capture(conv_model, xs, ["3"], positions=None, target=target)["3"]
    Z, _ = _materialized_conv(conv_model, 3, xs)
    _, Yt = _materialized_conv(target, 3, xs)
    # Y = target output − the *model's* bias (reference subtracts the model's bias too)
    Yt = Yt + target[3].bias.detach().double().numpy() - conv_model[3].bias.detach().double().numpy()
    _close(s.gram, Z.T @ Z)
    _close(s.cross, Z.T @ Yt)
    _close(s.target_sq, float(np.sum(Yt * Yt)))
    # and it differs from the model's own outputs
    own = capture(conv_model, xs, ["3"], positions=None)["3"]
    assert not np.allclose(own.cross, s.cross, rtol=1e-3)


def test_target_with_sampling_reads_the_same_positions(conv_model):
    xs = batches((2, 3, 8, 8), 2)
    same = capture(conv_model, xs, positions=3, target=conv_net())
    own = capture(conv_model, xs, positions=3)
    for name in own:
        _close(same[name].cross, own[name].cross, rel=1e-12)


def test_target_of_another_shape_raises(conv_model, conv_input):
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))  # layer "0" with 4 outputs instead of 6
    with pytest.raises(InvalidInputError, match="target layer '0' output must have shape \\(4, 6, 8, 8\\)"):
        capture(conv_model, [conv_input], ["0"], target=other)
    with pytest.raises(InvalidInputError, match="target must have a Conv2d/Linear named '3' like model"):
        capture(conv_model, [conv_input], ["3"], target=other)


def test_inputs_that_require_grad_are_fine(mlp_model, mlp_input):
    s = capture(mlp_model, [mlp_input.requires_grad_()], ["0"])["0"]
    X = mlp_input.detach().double().numpy()
    _close(s.gram, X.T @ X)


def test_groups_and_columns_per_channel(conv_model, conv_input):
    stats = capture(conv_model, [conv_input], positions=2)
    assert list(stats) == ["0", "3", "7", "9"]
    np.testing.assert_array_equal(stats["0"].groups, np.repeat(np.arange(3), 9))
    np.testing.assert_array_equal(stats["3"].groups, np.repeat(np.arange(6), 9))
    np.testing.assert_array_equal(stats["7"].groups, np.repeat(np.arange(5), 9))  # 5 maps of 3x3
    np.testing.assert_array_equal(stats["9"].groups, np.arange(7))
    assert stats["7"].columns_per_channel == 9 and stats["7"].n_channels == 5
    over = capture(conv_model, [conv_input], ["7"], columns_per_channel={"7": 1})["7"]
    assert over.n_channels == 45


def test_untraceable_model_warns_and_gives_linear_layers_one_column_per_feature():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            h = self.conv(x)
            h = h if h.sum() > 0 else -h  # value-dependent control flow: fx cannot trace it
            return self.fc(h.flatten(1))

    with pytest.warns(UserWarning, match="could not trace the model"):
        stats = capture(Opaque(), batches((2, 2, 6, 6), 1), positions=None)
    np.testing.assert_array_equal(stats["fc"].groups, np.arange(48))
    assert list(stats) == ["conv", "fc"]  # module order


def test_bad_columns_per_channel_raise(conv_model, conv_input):
    with pytest.raises(InvalidInputError, match="must divide in_features = 45; got 4"):
        capture(conv_model, [conv_input], ["7"], columns_per_channel={"7": 4})
    with pytest.raises(InvalidInputError, match="must be kh\\*kw = 9 for a conv; got 3"):
        capture(conv_model, [conv_input], ["3"], columns_per_channel={"3": 3})
    with pytest.raises(InvalidInputError, match="must name captured layers; got '9'"):
        capture(conv_model, [conv_input], ["7"], columns_per_channel={"9": 1})


def test_weights_layout_makes_the_current_weights_exact(conv_model, conv_input):
    for s in capture(conv_model, [conv_input], positions=4).values():
        assert isinstance(s, LayerStatistics)
        problem = s.problem()
        assert isinstance(problem, SelectionProblem)
        assert problem.error(np.ones(s.n_channels, bool), refit=False) < 1e-10
        assert s.weights.shape == s.cross.shape


def test_hooks_removed_and_modes_restored_after_an_exception(conv_model, conv_input):
    conv_model.train()
    conv_model[1].eval()
    before = {k: v.clone() for k, v in conv_model.state_dict().items()}
    with pytest.raises(InvalidInputError, match=r"calibration batch 1 has shape \(2, 4, 8, 8\); the model "
                       r"expects \(N, 3, H, W\) images"):
        capture(conv_model, [conv_input, torch.randn(2, 4, 8, 8)])  # 4 channels: the conv fails
    assert all(not m._forward_hooks for m in conv_model.modules())
    assert conv_model.training and conv_model[0].training and not conv_model[1].training
    for k, v in conv_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_capture_runs_in_eval_mode_without_touching_running_stats(conv_model, conv_input):
    conv_model.train()
    before = {k: v.clone() for k, v in conv_model.state_dict().items()}
    eval_stats = capture(conv_model.eval(), [conv_input], ["3"], positions=None)["3"]
    conv_model.train()
    train_stats = capture(conv_model, [conv_input], ["3"], positions=None)["3"]
    np.testing.assert_array_equal(eval_stats.gram, train_stats.gram)  # BN used running stats
    assert conv_model.training and all(not m._forward_hooks for m in conv_model.modules())
    for k, v in conv_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_grouped_conv_raises_when_asked_and_is_skipped_by_default():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    xs = batches((1, 4, 5, 5), 1)
    with pytest.raises(UnsupportedLayerError, match="layer '1' groups must be 1; got 4"):
        capture(model, xs, ["1"])
    assert list(capture(model, xs)) == ["0", "2"]


def test_empty_data_raises(conv_model):
    with pytest.raises(InvalidInputError, match="data must yield at least one batch; got none"):
        capture(conv_model, [])


def test_bad_layer_names_and_options_raise(conv_model, conv_input):
    with pytest.raises(InvalidInputError, match="got 'nope' \\(no such module\\)"):
        capture(conv_model, [conv_input], ["nope"])
    with pytest.raises(UnsupportedLayerError, match="layer '1' must be nn.Conv2d or nn.Linear; got BatchNorm2d"):
        capture(conv_model, [conv_input], ["1"])
    with pytest.raises(InvalidInputError, match="positions must be an integer >= 1 or None; got 0"):
        capture(conv_model, [conv_input], positions=0)
    with pytest.raises(InvalidInputError, match="max_samples must be an integer >= 1 or None; got -3"):
        capture(conv_model, [conv_input], max_samples=-3)
    with pytest.raises(InvalidInputError, match="tuple/list whose first item is the input tensor; got dict"):
        capture(conv_model, [{"x": conv_input}])


def test_batches_may_be_input_label_pairs(conv_model, conv_input):
    a = capture(conv_model, [(conv_input, torch.zeros(4))], ["3"], positions=None)["3"]
    b = capture(conv_model, [conv_input], ["3"], positions=None)["3"]
    np.testing.assert_array_equal(a.gram, b.gram)


def test_max_samples_caps_rows_and_stops_reading_data(conv_model):
    read = []

    def stream():
        for i, x in enumerate(batches((2, 3, 8, 8), 10)):
            read.append(i)
            yield x

    stats = capture(conv_model, stream(), ["0", "3"], positions=4, max_samples=13)
    assert {s.n_samples for s in stats.values()} == {13}
    assert len(read) == 2  # 8 rows per batch: the second batch fills both layers
    for s in stats.values():
        _close(s.cross, s.gram @ s.weights, rel=1e-5)


def test_a_layer_sample_does_not_depend_on_the_other_layers_captured(conv_model, conv_input):
    alone = capture(conv_model, [conv_input], ["3"], positions=3)["3"]
    together = capture(conv_model, [conv_input], positions=3)["3"]
    np.testing.assert_array_equal(alone.gram, together.gram)


def test_device_copy_leaves_the_model_alone(conv_model, conv_input):
    before = {k: v.clone() for k, v in conv_model.state_dict().items()}
    s = capture(conv_model, [conv_input], ["3"], device="cpu", positions=None, progress=True)["3"]
    ref = capture(conv_model, [conv_input], ["3"], positions=None)["3"]
    np.testing.assert_array_equal(s.gram, ref.gram)
    for k, v in conv_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_torch_accumulation_path_matches_the_blas_path(conv_model, monkeypatch):
    import mipprune.pruning.bridge as bridge

    xs = batches((2, 3, 8, 8), 3)
    blas = capture(conv_model, xs, positions=4)
    monkeypatch.setattr(bridge, "CPU_BLAS", False)  # the path CUDA models take
    torch_path = capture(conv_model, xs, positions=4)
    for name, s in blas.items():
        _close(torch_path[name].gram, s.gram)
        _close(torch_path[name].cross, s.cross)
        _close(torch_path[name].target_sq, s.target_sq)
        np.testing.assert_array_equal(s.gram, s.gram.T)


def test_float64_model_gets_float32_data_cast(conv_model, conv_input):
    s = capture(conv_model.double(), [conv_input], ["3"], positions=None)["3"]
    _close(s.cross, s.gram @ s.weights, rel=1e-10)


# ----------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_capture_on_cuda_matches_cpu(conv_model):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    xs = batches((3, 3, 8, 8), 3)
    cpu = capture(conv_model, xs, positions=4, seed=3)
    gpu_model = conv_net().cuda()
    gpu = capture(gpu_model, xs, positions=4, seed=3)
    assert next(gpu_model.parameters()).is_cuda
    for name in cpu:
        _close(gpu[name].gram, cpu[name].gram, rel=1e-5)
        _close(gpu[name].cross, cpu[name].cross, rel=1e-5)
        _close(gpu[name].cross, gpu[name].gram @ gpu[name].weights, rel=1e-5)


@pytest.mark.gpu
@cuda
def test_device_option_moves_a_copy_to_cuda(conv_model):
    torch.backends.cudnn.allow_tf32 = False
    xs = batches((3, 3, 8, 8), 2)
    gpu = capture(conv_model, xs, positions=None, device="cuda", target=conv_net())
    assert not next(conv_model.parameters()).is_cuda
    cpu = capture(conv_model, xs, positions=None, target=conv_net())
    for name in cpu:
        _close(gpu[name].gram, cpu[name].gram, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_named_as_such(conv_model, conv_input, bad):
    x = conv_input.clone()
    x[1, 2, 3, 4] = bad
    with pytest.raises(InvalidInputError, match=r"calibration data contains NaN/inf: batch 1 \(shape \(4, 3, 8, 8\)\) "
                                                r"has 1 non-finite entry"):
        capture(conv_model, [conv_input, x])


def test_activations_that_overflow_inside_the_model_are_named_as_such(conv_model, conv_input):
    with torch.no_grad():
        conv_model[0].weight.fill_(3e38)   # finite inputs and weights, float32 overflow in the first conv
    with pytest.raises(InvalidInputError, match="calibration data must give finite activations; got NaN/inf at "
                                                "layer '3'"):
        capture(conv_model, [conv_input], ["3"])
