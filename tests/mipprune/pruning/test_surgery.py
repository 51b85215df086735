"""Channel surgery: the pruned copy computes what the dense model computes without those channels."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mipprune.pruning.bridge import capture
from mipprune.pruning.graph import find_prune_groups
from mipprune.pruning.surgery import prune_channels
from solvers.errors import InvalidInputError
from tests.mipprune.conftest import batches

pytestmark = pytest.mark.usefixtures("one_thread")

# (model fixture, consumer, mask over its input channels): the three shapes of group the brief names
# plus BatchNorm1d + Dropout and the functional/view model
CASES = [
    ("conv", "3", [1, 0, 1, 1, 0, 1]),            # conv → BN → ReLU → conv
    ("conv", "7", [0, 1, 1, 0, 1]),               # conv → ReLU → MaxPool → Flatten → Linear
    ("conv", "9", [1, 0, 1, 1, 0, 1, 0]),         # Linear → ReLU → Linear
    ("mlp", "6", [1, 0, 0, 1, 1, 0, 1]),          # Linear → BN1d → ReLU → Dropout → Linear
    ("functional", "conv2", [0, 1, 1, 0]),        # F.relu(bn(conv)) → conv
    ("functional", "fc1", [1, 0, 1]),             # max_pool2d → view(x.size(0), -1) → Linear
]


def _model_and_input(request, kind):
    return request.getfixturevalue(f"{kind}_model").eval(), request.getfixturevalue(f"{kind}_input")


def _zero_dropped_inputs(model, consumer, mask, cols):
    """A copy whose consumer reads nothing from the dropped channels."""
    out = copy.deepcopy(model)
    w = dict(out.named_modules())[consumer].weight
    drop = torch.as_tensor(np.repeat(~np.asarray(mask, bool), cols))
    with torch.no_grad():
        w.reshape(w.shape[0], -1)[:, drop] = 0.0
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind, consumer, mask", CASES)
def test_keeping_every_channel_reproduces_outputs_exactly(request, kind, consumer, mask):
    model, x = _model_and_input(request, kind)
    pruned = prune_channels(model, {consumer: (np.ones(len(mask), bool), None)}, x)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("kind, consumer, mask", CASES)
def test_removing_channels_with_zero_outgoing_weights_reproduces_outputs(request, kind, consumer, mask):
    model, x = _model_and_input(request, kind)
    mask = np.asarray(mask, bool)
    group = {g.consumer: g for g in find_prune_groups(model, x)}[consumer]
    base = _zero_dropped_inputs(model, consumer, mask, group.columns_per_channel)
    pruned = prune_channels(base, {consumer: (mask, None)}, x)
    mods = dict(pruned.named_modules())
    producer = mods[group.producer]
    assert producer.weight.shape[0] == mask.sum()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), base(x), rtol=1e-6, atol=1e-6)
        # and the channels did matter: zeroing them changed the dense output
        assert not torch.allclose(base(x), model(x), atol=1e-4)


def test_batchnorm_is_sliced_consistently(conv_model, conv_input):
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    pruned = prune_channels(conv_model, {"3": (mask, None)}, conv_input)
    bn, old = pruned[1], conv_model[1]
    assert bn.num_features == 4
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, attr), getattr(old, attr)[torch.as_tensor(mask)]), attr
    assert isinstance(bn.weight, nn.Parameter) and not isinstance(bn.running_mean, nn.Parameter)
    assert torch.equal(pruned[0].weight, conv_model[0].weight[torch.as_tensor(mask)])
    assert torch.equal(pruned[0].bias, conv_model[0].bias[torch.as_tensor(mask)])
    assert torch.equal(pruned[3].weight, conv_model[3].weight[:, torch.as_tensor(mask)])
    assert (pruned[0].out_channels, pruned[3].in_channels) == (4, 4)


def test_input_model_is_never_touched(conv_model, conv_input):
    conv_model.train()
    before = _state(conv_model)
    weight_obj = conv_model[3].weight
    pruned = prune_channels(conv_model, {"3": (np.array([1, 0, 1, 1, 0, 1], bool), np.zeros((36, 5))),
                                         "7": (np.array([1, 1, 0, 1, 1], bool), None)}, conv_input)
    assert conv_model[3].weight is weight_obj
    for k, v in conv_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert conv_model.training and pruned.training  # mode kept; running the check did not leak
    assert conv_model[1].running_mean.shape == (6,)


def test_new_weights_in_kept_or_full_layout_are_written_in(conv_model, conv_input):
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    rng = np.random.default_rng(0)
    full = rng.normal(size=(54, 5))                       # d = 6 channels × 9, m = 5 outputs
    kept = full[np.repeat(mask, 9)]
    a = prune_channels(conv_model, {"3": (mask, full)}, conv_input)
    b = prune_channels(conv_model, {"3": (mask, kept)}, conv_input)
    expected = torch.as_tensor(kept.T, dtype=torch.float32).reshape(5, 4, 3, 3)
    assert torch.equal(a[3].weight, expected) and torch.equal(b[3].weight, expected)
    assert a[3].weight.dtype == conv_model[3].weight.dtype
    lin = prune_channels(conv_model, {"7": (np.array([1, 0, 1, 1, 0], bool), np.ones((27, 7)))}, conv_input)
    assert lin[7].weight.shape == (7, 27) and lin[7].in_features == 27 and torch.all(lin[7].weight == 1)


def test_chained_groups_slice_a_layer_as_consumer_and_producer(conv_model, conv_input):
    m3, m7 = np.array([1, 0, 1, 1, 0, 1], bool), np.array([0, 1, 1, 0, 1], bool)
    base = _zero_dropped_inputs(conv_model.eval(), "3", m3, 9)
    base = _zero_dropped_inputs(base, "7", m7, 9)
    full = base[3].weight.detach().reshape(5, -1).T.double().numpy()
    pruned = prune_channels(base, {"3": (m3, full), "7": (m7, None)}, conv_input)
    assert pruned[3].weight.shape == (3, 4, 3, 3)  # outputs cut by "7", inputs by "3"
    assert pruned[7].weight.shape == (7, 27)
    with torch.no_grad():
        torch.testing.assert_close(pruned(conv_input), base(conv_input), rtol=1e-6, atol=1e-6)


def test_refitted_weights_reach_the_error_the_problem_predicts(conv_model):
    conv_model.eval()
    xs = batches((4, 3, 8, 8), 2)
    stats = capture(conv_model, xs, ["3"], positions=None)["3"]
    problem = stats.problem()
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    pruned = prune_channels(conv_model, {"3": (mask, problem.refit(mask))}, xs[0])

    def layer_out(model, x):
        got = {}
        h = model[3].register_forward_hook(lambda _m, _i, o: got.setdefault("y", o - model[3].bias[:, None, None]))
        with torch.no_grad():
            model(x)
        h.remove()
        return got["y"].double()

    num = sum(float(((layer_out(conv_model, x) - layer_out(pruned, x)) ** 2).sum()) for x in xs)
    den = sum(float((layer_out(conv_model, x) ** 2).sum()) for x in xs)
    assert num / den == pytest.approx(problem.error(mask), rel=1e-4, abs=1e-7)
    # and refitting beats plain slicing of the old weights
    assert problem.error(mask) < problem.error(mask, refit=False)


def test_without_example_input_gives_the_same_model(functional_model, functional_input):
    plan = {"conv2": (np.array([0, 1, 1, 1], bool), None), "fc1": (np.array([1, 0, 1], bool), None)}
    a = prune_channels(functional_model, plan)
    b = prune_channels(functional_model, plan, functional_input)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_plans_raise(conv_model, conv_input):
    ok = np.array([1, 0, 1, 1, 0, 1], bool)
    with pytest.raises(InvalidInputError, match="plan keys must be module names of the model; got 'nope'"):
        prune_channels(conv_model, {"nope": (ok, None)})
    with pytest.raises(InvalidInputError, match="plan key '0' must be a layer whose input channels can be pruned"):
        prune_channels(conv_model, {"0": (np.ones(3, bool), None)})
    with pytest.raises(InvalidInputError, match="mask of '3' must have shape \\(6,\\) \\(one per channel\\); got \\(5,\\)"):
        prune_channels(conv_model, {"3": (ok[:5], None)})
    with pytest.raises(InvalidInputError, match="mask of '3' must keep at least one channel; got all False"):
        prune_channels(conv_model, {"3": (np.zeros(6, bool), None)})
    with pytest.raises(InvalidInputError, match="mask of '3' must be boolean \\(or 0/1\\)"):
        prune_channels(conv_model, {"3": (np.full(6, 2), None)})
    with pytest.raises(InvalidInputError, match="weights of '3' must have shape \\(36, 5\\) .* or \\(54, 5\\); got \\(36, 4\\)"):
        prune_channels(conv_model, {"3": (ok, np.zeros((36, 4)))})
    with pytest.raises(InvalidInputError, match="plan\\['3'\\] must be a pair"):
        prune_channels(conv_model, {"3": ok})
    with pytest.raises(InvalidInputError, match="plan must be a dict"):
        prune_channels(conv_model, [("3", ok)])


def test_layer_in_a_residual_block_cannot_be_planned():
    from tests.mipprune.conftest import ResidualNet

    with pytest.raises(InvalidInputError, match="must be a layer whose input channels can be pruned alone"):
        prune_channels(ResidualNet(), {"conv2": (np.ones(4, bool), None)}, torch.randn(1, 2, 5, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_surgery_on_a_cuda_model_keeps_device_and_outputs(conv_model, conv_input):
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    base = _zero_dropped_inputs(conv_model.eval(), "3", mask, 9).cuda()
    pruned = prune_channels(base, {"3": (mask, np.zeros((36, 5)))}, conv_input)
    assert pruned[3].weight.is_cuda and pruned[1].running_var.is_cuda
    pruned = prune_channels(base, {"3": (mask, None)}, conv_input.cuda())
    with torch.no_grad():
        torch.testing.assert_close(pruned(conv_input.cuda()), base(conv_input.cuda()), rtol=1e-5, atol=1e-5)
