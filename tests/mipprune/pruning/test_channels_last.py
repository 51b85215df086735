"""Channel groups on channels-last tensors: the Linear → GELU [→ Dropout] → Linear MLP of a
ConvNeXt block (after its permute) and of a ViT block on (N, T, D)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mipprune.pruning.channel_graph import build_channel_graph
from mipprune.pruning.group_budget import group_cost
from mipprune.pruning.group_surgery import prune_groups
from mipprune.pruning.selector import ChannelSelector

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNeXtLike(nn.Module):
    """stem → [dwconv → permute → LayerNorm → Linear(C, 4C') → GELU → Linear → permute → layer scale
    + residual] → mean → head: torchvision's CNBlock, small."""

    def __init__(self, c: int = 8, hidden: int = 512):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, c)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        x = x + self.layer_scale * y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class ViTMLPLike(nn.Module):
    """(N, T, P) patches → embed → [LayerNorm → Linear(D, M) → GELU → Dropout → Linear(M, D) +
    residual] → class token → head."""

    def __init__(self, p: int = 12, d: int = 8, m: int = 32):
        super().__init__()
        self.embed = nn.Linear(p, d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, m)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(m, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))
        return self.head(x[:, 0])


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {"convnext": (ConvNeXtLike, (2, 3, 8, 8)), "vit": (ViTMLPLike, (2, 5, 12))}


def _model(name):
    torch.manual_seed(0)
    cls, shape = CASES[name]
    return cls().eval(), _x(shape)


def _producing(graph, module):
    (g,) = graph.group_of(module, "producer")
    return g


@pytest.mark.parametrize("name", list(CASES))
def test_mlp_hidden_group_is_prunable_and_the_rest_fixed_with_reasons(name):
    model, x = _model(name)
    graph = build_channel_graph(model, x)
    (hidden,) = graph.prunable
    assert hidden is _producing(graph, "fc1")
    assert hidden.n_units == model.fc1.out_features
    assert [m.module for m in hidden.producers] == ["fc1"] and [m.module for m in hidden.consumers] == ["fc2"]
    stream = _producing(graph, "fc2")  # the residual stream behind a permute / LayerNorm stays whole
    assert not stream.prunable
    why = " ".join(stream.fixed)
    assert ("permute" if name == "convnext" else "LayerNorm") in why
    blocked = graph.blocked()
    assert "fc2" not in blocked and "fc1" not in blocked and "head" in blocked


def test_last_axis_maps_do_not_mix_with_channel_maps():
    class Mixed(nn.Module):  # a Linear on (N, C, H, W) mixes W, a conv then reads C: C stays whole
        def __init__(self):
            super().__init__()
            self.conv1, self.lin, self.conv2 = nn.Conv2d(3, 4, 1), nn.Linear(8, 8), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv2(torch.relu(self.lin(self.conv1(x))))

    graph = build_channel_graph(Mixed().eval(), _x((1, 3, 8, 8)))
    assert not graph.prunable
    assert any("Linear 'lin'" in r for r in _producing(graph, "conv1").fixed)
    assert any("convolution on an unmapped tensor" in r for r in _producing(graph, "lin").fixed)


@pytest.mark.parametrize("name", list(CASES))
def test_all_kept_is_equivalent_and_zero_units_removed_reproduce_outputs(name):
    model, x = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build_channel_graph(model, x)
    hidden = graph.prunable[0]
    with torch.no_grad():
        dense = model(x)
        same = prune_groups(model, graph, {hidden.id: np.ones(hidden.n_units, bool)}, example_input=x)(x)
    torch.testing.assert_close(same, dense, rtol=1e-6, atol=1e-6)
    # hidden units whose fc1 row and bias are zero give GELU(0) = 0: removing them changes nothing
    drop = np.arange(hidden.n_units) % 3 == 1
    zeroed = _model(name)[0]
    with torch.no_grad():
        zeroed.fc1.weight[torch.as_tensor(drop)] = 0
        zeroed.fc1.bias[torch.as_tensor(drop)] = 0
        want = zeroed(x)
        pruned = prune_groups(zeroed, graph, {hidden.id: ~drop}, example_input=x)
        got = pruned(x)
    assert pruned.fc1.out_features == pruned.fc2.in_features == int((~drop).sum())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", list(CASES))
def test_flops_and_params_polynomial_match_flop_counter(name):
    model, x = _model(name)
    graph = build_channel_graph(model, x)
    hidden = graph.prunable[0]
    flops, params = group_cost(model, graph, x, "flops"), group_cost(model, graph, x, "params")
    for k in (hidden.n_units, hidden.n_units // 2 + 1, 1):
        mask = np.zeros(hidden.n_units, bool)
        mask[:: max(1, hidden.n_units // k)][:k] = True
        k = int(mask.sum())
        pruned = prune_groups(model, graph, {hidden.id: mask})
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            pruned(x[:1])
        assert counter.get_total_flops() == pytest.approx(2 * flops.cost({hidden.name: k}), rel=1e-12)
        n_params = sum(p.numel() for p in pruned.parameters())
        assert n_params == pytest.approx(params.cost({hidden.name: k}), rel=1e-12)


@pytest.mark.parametrize("groups", ["auto", "graph"])  # auto: the lone MLP is a plain pair
def test_lasso_flops_budget_lands_in_the_window_on_the_convnext_like_block(groups):
    model, _ = _model("convnext")
    data = [_x((8, 3, 8, 8), seed=s) for s in (1, 2)]
    sel = ChannelSelector("lasso", flops=0.5, groups=groups).fit(model, data)
    assert (sel.graph_ is not None) == (groups == "graph")
    b = sel.budget_
    assert b["in_window"] and 0.995 * 0.5 <= b["achieved_ratio"] <= 0.5
    x = data[0][:1]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    dense = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sel.pruned_model_(x)
    assert counter.get_total_flops() / dense == pytest.approx(b["achieved_ratio"], rel=1e-12)
    assert sel.pruned_model_.fc1.out_features < model.fc1.out_features


@pytest.mark.parametrize("shape", [(4, 1, 1), (4,)])
def test_a_lower_rank_operand_spanning_the_channels_keeps_them_whole(shape):
    class Scaled(nn.Module):  # a (C, 1, 1) layer scale on (N, C, H, W) / a (C,) gain on (N, C)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.gain = nn.Parameter(torch.full(shape, 2.0))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            if len(shape) == 1:
                return self.head(y.mean((2, 3)) * self.gain)
            return self.head((y * self.gain).mean((2, 3)))

    g = _producing(build_channel_graph(Scaled().eval(), _x((1, 3, 4, 4))), "conv")
    assert not g.prunable and any("elementwise" in r for r in g.fixed)
