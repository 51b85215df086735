"""Dependency analysis: which producer/consumer pairs can lose channels alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mipprune.pruning.graph import PruneGroup, find_prune_groups, prunable_layers
from mipprune.torch_utils import evaluation_mode
from solvers.errors import InvalidInputError, UnsupportedLayerError
from tests.mipprune.conftest import BranchNet, DataDependent, ResidualNet, ReversedNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_consumer(groups):
    return {g.consumer: g for g in groups}


def test_conv_bn_relu_conv_group_carries_batchnorm_and_kernel_columns(conv_model, conv_input):
    groups = _by_consumer(find_prune_groups(conv_model, conv_input))
    assert groups["3"] == PruneGroup(consumer="3", producer="0", batchnorms=("1",), n_channels=6,
                                     columns_per_channel=9)


def test_linear_after_flatten_of_conv_map_has_one_column_per_pixel(conv_model, conv_input):
    groups = _by_consumer(find_prune_groups(conv_model, conv_input))
    # conv "3" gives 5 maps of 6x6, max-pooled to 3x3, flattened into Linear "7"
    assert groups["7"] == PruneGroup("7", "3", (), 5, 9)
    assert groups["9"] == PruneGroup("9", "7", (), 7, 1)


def test_global_pool_then_flatten_gives_one_column_per_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    (g,) = find_prune_groups(model, torch.randn(2, 3, 7, 7))
    assert (g.consumer, g.producer, g.n_channels, g.columns_per_channel) == ("4", "0", 4, 1)


def test_linear_chain_with_batchnorm1d_and_dropout(mlp_model, mlp_input):
    groups = find_prune_groups(mlp_model, mlp_input)
    assert groups == [PruneGroup("2", "0", (), 8, 1), PruneGroup("6", "2", ("3",), 7, 1)]


def test_functional_relu_pool_and_view_flatten_are_followed(functional_model, functional_input):
    groups = find_prune_groups(functional_model, functional_input)
    assert groups == [
        PruneGroup("conv2", "conv1", ("bn",), 4, 9),
        PruneGroup("fc1", "conv2", (), 3, 16),
        PruneGroup("fc2", "fc1", (), 5, 1),
    ]


@pytest.mark.parametrize("name", ["conv", "mlp", "functional"])
def test_groups_without_example_input_match_the_shape_checked_ones(name, request):
    model = request.getfixturevalue(f"{name}_model")
    x = request.getfixturevalue(f"{name}_input")
    assert find_prune_groups(model) == find_prune_groups(model, x)


def test_residual_add_pairs_are_not_groups():
    groups = find_prune_groups(ResidualNet(), torch.randn(1, 2, 5, 5))
    # conv1's output feeds conv2 and the add; conv2's output goes through the add: no group at all
    assert groups == []


def test_tensor_read_by_two_layers_and_concat_are_not_groups():
    assert find_prune_groups(BranchNet(), torch.randn(1, 2, 5, 5)) == []


def test_grouped_convolution_pairs_are_skipped():
    model = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 3, 1))
    assert find_prune_groups(model, torch.randn(1, 2, 6, 6)) == []


def test_module_called_twice_is_not_a_group():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    assert find_prune_groups(Twice(), torch.randn(2, 3)) == []


def test_first_layer_is_never_a_consumer_nor_last_layer_a_producer(conv_model, conv_input):
    groups = find_prune_groups(conv_model, conv_input)
    assert "0" not in {g.consumer for g in groups}
    assert "9" not in {g.producer for g in groups}


def test_linear_producer_flattened_over_tokens_is_not_a_group():
    # (N, T=3, F=4) → flatten → Linear(12): a feature's columns are interleaved, not contiguous
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    assert find_prune_groups(model, torch.randn(2, 3, 5)) == []
    assert find_prune_groups(model) == []


def test_batchnorm1d_over_tokens_is_not_sliced_with_features():
    # BatchNorm1d(3) on (N, 3, 3) normalizes the token dim, which happens to equal the features
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    assert find_prune_groups(model, torch.randn(2, 3, 5)) == []
    assert find_prune_groups(model, torch.randn(2, 5)) == [PruneGroup("2", "0", ("1",), 3, 1)]


def test_forward_order_not_definition_order():
    model = ReversedNet()
    assert prunable_layers(model) == ["first", "middle", "last"]
    assert [g.consumer for g in find_prune_groups(model, torch.randn(2, 3))] == ["middle", "last"]


def test_untraceable_sequential_falls_back_to_module_order():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), DataDependent(), nn.Linear(6, 2))
    groups = find_prune_groups(model, torch.randn(2, 4))
    # the opaque module cuts the chain: only the first pair is a group
    assert groups == [PruneGroup("2", "0", (), 5, 1)]
    assert find_prune_groups(model) == groups
    assert prunable_layers(model) == ["0", "2", "4"]


def test_untraceable_custom_model_raises():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedLayerError, match="traceable by torch.fx"):
        find_prune_groups(Opaque(), torch.randn(1, 2))


def test_example_input_that_does_not_run_raises(conv_model):
    with pytest.raises(InvalidInputError, match="example_input must run through the model; got"):
        find_prune_groups(conv_model, torch.randn(1, 4, 8, 8))


def test_analysis_leaves_modes_and_running_stats_alone(conv_model, conv_input):
    conv_model.train()
    conv_model[1].eval()  # a mixed-mode model keeps its mix
    before = {k: v.clone() for k, v in conv_model.state_dict().items()}
    find_prune_groups(conv_model, conv_input)
    assert conv_model.training and conv_model[0].training and not conv_model[1].training
    for k, v in conv_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_evaluation_mode_restores_flags_on_error(mlp_model):
    mlp_model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluation_mode(mlp_model):
            assert not mlp_model.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert all(m.training for m in mlp_model.modules())
