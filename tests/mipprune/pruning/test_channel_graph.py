"""Channel groups through residual adds, concat, depthwise/grouped convs, gates and channel shuffle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mipprune.pruning.channel_graph import build_channel_graph
from solvers.errors import InvalidInputError, UnsupportedLayerError
from tests.mipprune.conftest import ResidualNet
from tests.mipprune.pruning.blocks import BLOCKS

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _roles(group):
    out = {}
    for m in group.members:
        out.setdefault(m.role, set()).add(m.module)
    return out


def _group_with(graph, producer):
    (g,) = [g for g in graph.groups if any(m.module == producer and m.role == "producer" for m in g.members)]
    return g


def test_basic_block_with_one_reused_relu_merges_the_residual_stream():
    graph = build_channel_graph(BLOCKS["basic"](), X)
    g = _group_with(graph, "conv1")
    assert g.prunable and g.n_units == 6
    assert _roles(g) == {"producer": {"conv1", "layer1.0.conv2", "layer1.1.conv2"},
                         "batchnorm": {"bn1", "layer1.0.bn2", "layer1.1.bn2"},
                         "consumer": {"layer1.0.conv1", "layer1.1.conv1", "fc"}}
    inner = _group_with(graph, "layer1.0.conv1")
    assert inner.prunable and _roles(inner)["consumer"] == {"layer1.0.conv2"}
    assert len(graph.prunable) == 3


def test_bottleneck_downsample_shares_the_output_group():
    graph = build_channel_graph(BLOCKS["bottleneck"](), X)
    out = _group_with(graph, "block.conv3")
    assert _roles(out)["producer"] == {"block.conv3", "block.downsample.0"}
    assert _roles(out)["batchnorm"] == {"block.bn3", "block.downsample.1"}
    assert _roles(out)["consumer"] == {"fc"}
    assert _roles(_group_with(graph, "stem"))["consumer"] == {"block.conv1", "block.downsample.0"}


def test_grouped_conv_removes_whole_convolution_groups():
    graph = build_channel_graph(BLOCKS["resnext"](), X)
    g = _group_with(graph, "block.conv1")
    assert (g.n_units, g.unit_size) == (2, 4)
    assert _roles(g) == {"producer": {"block.conv1"}, "batchnorm": {"block.bn1", "block.bn2"},
                         "grouped": {"block.conv2"}, "consumer": {"block.conv3"}}
    (conv3,) = g.consumers
    np.testing.assert_array_equal(conv3.units, [0, 0, 0, 0, 1, 1, 1, 1])


def test_inverted_residual_with_depthwise_conv_and_squeeze_excitation():
    graph = build_channel_graph(BLOCKS["inverted"](), X)
    hidden = _group_with(graph, "block.expand.0")
    assert _roles(hidden) == {"producer": {"block.expand.0", "block.se.fc2"},
                              "batchnorm": {"block.expand.1", "block.dw.1"}, "grouped": {"block.dw.0"},
                              "consumer": {"block.se.fc1", "block.project.0"}}
    assert hidden.n_units == 12 and hidden.unit_size == 1
    residual = _group_with(graph, "stem.0")
    assert _roles(residual)["producer"] == {"stem.0", "block.project.0"}
    assert _roles(residual)["consumer"] == {"block.expand.0", "head"}
    assert _group_with(graph, "block.se.fc1").prunable


def test_dense_block_concat_maps_columns_to_each_source():
    graph = build_channel_graph(BLOCKS["dense"](), X)
    stem, a, b = (_group_with(graph, n) for n in ("stem", "conv_a", "conv_b"))
    assert _roles(stem)["consumer"] == {"conv_a", "conv_b", "transition"}
    assert _roles(a)["batchnorm"] == {"bn_b", "bn_t"}
    (t_of_a,) = [m for m in a.consumers if m.module == "transition"]
    np.testing.assert_array_equal(t_of_a.units, [-1] * 4 + [0, 1, 2] + [-1] * 3)
    (t_of_b,) = [m for m in b.consumers if m.module == "transition"]
    np.testing.assert_array_equal(t_of_b.units, [-1] * 7 + [0, 1, 2])
    (conv_b,) = [m for m in stem.consumers if m.module == "conv_b"]
    assert conv_b.columns_per_channel == 9 and conv_b.column_units().size == 7 * 9


def test_channel_shuffle_ties_branches_and_chunk_keeps_its_input_whole():
    graph = build_channel_graph(BLOCKS["shuffle"](), X)
    branches = _group_with(graph, "branch1.2")
    assert _roles(branches)["producer"] == {"branch1.2", "branch2.5"}  # tied by the shuffle
    assert not branches.prunable and any("chunk" in r for r in branches.fixed)
    inner = _group_with(graph, "branch2.0")
    assert inner.prunable and _roles(inner)["grouped"] == {"branch2.3"}
    assert _group_with(graph, "stem").prunable


def test_grouped_block_and_fixed_input_output_groups():
    graph = build_channel_graph(BLOCKS["grouped"](), X)
    assert [(g.name, g.n_units, g.unit_size) for g in graph.prunable] == [("conv1", 4, 2)]
    fixed = {r for g in graph.groups for r in g.fixed}
    assert "reads the network input" in fixed and "is the network output" in fixed


def test_pair_model_groups_agree_with_pair_analysis(conv_model, conv_input):
    from mipprune.pruning.graph import find_prune_groups

    graph = build_channel_graph(conv_model, conv_input)
    pairs = {(g.producer, g.consumer, g.n_channels, g.columns_per_channel) for g in find_prune_groups(conv_model, conv_input)}
    mine = {(g.producers[0].module, g.consumers[0].module, g.n_units, g.consumers[0].columns_per_channel)
            for g in graph.prunable if len(g.producers) == len(g.consumers) == 1}
    assert mine == pairs and len(graph.prunable) == len(pairs)


def test_residual_net_is_one_group_now():
    # the pair analysis finds nothing here (see test_graph); groups merge conv1 and conv2 through the add
    graph = build_channel_graph(ResidualNet(), torch.randn(1, 2, 5, 5))
    (g,) = graph.prunable
    assert _roles(g) == {"producer": {"conv1", "conv2"}, "consumer": {"conv2", "conv3"}}


def test_nothing_prunable_names_the_blocking_ops():
    class Opaque(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Opaque(), nn.Conv2d(4, 2, 3))
    graph = build_channel_graph(model, X)
    assert graph.prunable == []
    with pytest.raises(UnsupportedLayerError, match=r"0: .*roll"):
        graph.require_prunable()


def test_module_with_weights_called_twice_stays_whole():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x)))))))

    graph = build_channel_graph(Twice(), torch.randn(2, 3))
    assert graph.prunable == []
    assert any("called 2 times" in r for g in graph.groups for r in g.fixed)


def test_bad_example_input_and_untraceable_model():
    with pytest.raises(InvalidInputError, match="example_input must run"):
        build_channel_graph(BLOCKS["basic"](), torch.randn(1, 4, 8, 8))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedLayerError, match="traceable"):
        build_channel_graph(Branchy(), X)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_graph_after_pruning_equals_a_retrace_of_the_pruned_model(name):
    # The sequential driver slices the graph instead of tracing the pruned model after every group:
    # the two must agree member by member (units of every module's sliced dimension, group sizes).
    from mipprune.pruning.group_surgery import prune_groups

    model = BLOCKS[name]()
    graph = build_channel_graph(model, X)
    rng = np.random.default_rng(0)
    masks = {}
    for g in graph.prunable[::2] or graph.prunable:  # every other group: untouched neighbours too
        keep = np.zeros(g.n_units, bool)
        keep[rng.choice(g.n_units, max(1, g.n_units // 2), replace=False)] = True
        masks[g.id] = keep
    sliced = graph.after_pruning(masks)
    retraced = build_channel_graph(prune_groups(model, graph, masks, None, X), X)

    def summary(gr):
        return {g.name: (g.n_units, g.unit_size, sorted((m.module, m.role, tuple(m.units.tolist()),
                                                         m.columns_per_channel) for m in g.members))
                for g in gr.groups}

    assert masks and summary(sliced) == summary(retraced)
    assert [g.fixed for g in sliced.groups] == [g.fixed for g in graph.groups]
