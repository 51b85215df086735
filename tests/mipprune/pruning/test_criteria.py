"""Importance criteria (mipprune.pruning.criteria) and their use as ChannelSelector methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mipprune.pruning.criteria import CRITERIA, activation_statistics, channel_scores, similarity_clusters
from mipprune.pruning.graph import find_prune_groups
from mipprune.pruning.selector import ChannelSelector
from solvers.errors import InvalidInputError
from tests.mipprune.conftest import FunctionalNet, batches, conv_net


@pytest.fixture
def net_and_groups():
    model = conv_net()
    data = batches((16, 3, 8, 8), 2, seed=5)
    groups = {g.consumer: g for g in find_prune_groups(model, data[0][:1])}
    return model, data, groups


def _post_activation(model: nn.Sequential, x: torch.Tensor, upto: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()[: upto + 1](x)


# ------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_gives_one_finite_score_per_channel(criterion, net_and_groups):
    model, data, groups = net_and_groups
    for name, g in groups.items():
        if criterion == "bn_scale" and not g.batchnorms:
            with pytest.raises(InvalidInputError, match=rf"criterion 'bn_scale' needs an affine BatchNorm between "
                                                        rf"producer '{g.producer}' and consumer '{name}'; got none"):
                channel_scores(criterion, model, g, data)
            continue
        s = channel_scores(criterion, model, g, data, k=max(1, g.n_channels // 2))
        assert s.shape == (g.n_channels,) and s.dtype == np.float64 and np.all(np.isfinite(s))


def test_weight_criteria_read_the_producer(net_and_groups):
    model, _, groups = net_and_groups
    g = groups["3"]  # producer conv 0, BatchNorm 1
    l1 = model[0].weight.detach().abs().sum(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(channel_scores("l1", model, g), l1, rtol=1e-6)
    np.testing.assert_allclose(channel_scores("bn_scale", model, g), model[1].weight.detach().abs().numpy(), rtol=1e-6)


def test_activation_criteria_match_the_post_activation_maps(net_and_groups):
    model, data, groups = net_and_groups
    x = torch.cat(data)
    # conv producer 0 → BN 1 → ReLU 2: maps (N, 6, 8, 8)
    maps = _post_activation(model, x, 2)
    ranks = torch.linalg.matrix_rank(maps).double().mean(dim=0).numpy()
    hr = channel_scores("hrank", model, groups["3"], data)
    assert np.all(hr >= ranks - 1e-12) and np.all(hr < ranks + 0.5 / len(x) + 1e-12)  # tie-break below 1/N
    mean = maps.abs().mean(dim=(0, 2, 3)).double().numpy()
    np.testing.assert_allclose(channel_scores("mean_activation", model, groups["3"], data), mean, rtol=1e-5)
    # Linear producer 7 → ReLU 8: 1×1 maps, HRank is the firing rate
    act = _post_activation(model, x, 8)
    fire = (act != 0).double().mean(dim=0).numpy()
    hr_lin = channel_scores("hrank", model, groups["9"], data)
    assert np.all(hr_lin >= fire - 1e-12) and np.all(hr_lin < fire + 0.5 / len(x) + 1e-12)
    # max_images caps what is read
    assert activation_statistics(model, groups["3"], data, max_images=5).n_images == 5


def test_activation_criteria_trace_functional_relus():
    model = FunctionalNet()
    data = batches((8, 2, 8, 8), 1, seed=3)
    g = next(g for g in find_prune_groups(model, data[0][:1]) if g.producer == "conv1")
    with torch.no_grad():
        maps = F.relu(model.eval().bn(model.conv1(data[0])))
    np.testing.assert_allclose(channel_scores("mean_activation", model, g, data),
                               maps.abs().mean(dim=(0, 2, 3)).double().numpy(), rtol=1e-5)


def test_activation_criteria_read_untraceable_sequentials_with_a_hook():
    from tests.mipprune.conftest import DataDependent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), DataDependent())  # fx cannot trace it
    data = batches((10, 3), 1, seed=4)
    g = find_prune_groups(model, data[0][:1])[0]
    with torch.no_grad():
        act = torch.relu(model[0](data[0]))
    np.testing.assert_allclose(channel_scores("mean_activation", model, g, data),
                               act.abs().mean(dim=0).double().numpy(), rtol=1e-5)


def test_similarity_keeps_one_channel_of_each_duplicate_pair():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():  # channels 4..7 duplicate 0..3 (scaled: same direction)
        big = nn.Conv2d(2, 8, 3, padding=1)
        big.weight.copy_(torch.cat([conv.weight, 2 * conv.weight]))
        big.bias.copy_(torch.cat([conv.bias, 2 * conv.bias]))
    model = nn.Sequential(big, nn.ReLU(), nn.Conv2d(8, 3, 1))
    data = batches((6, 2, 6, 6), 1, seed=1)
    g = find_prune_groups(model, data[0][:1])[0]
    stats = activation_statistics(model, g, data)
    labels = similarity_clusters(stats, 4)
    np.testing.assert_array_equal(labels[:4], labels[4:])          # each pair shares a cluster
    assert len(set(labels[:4].tolist())) == 4
    s = channel_scores("similarity", model, g, data, k=4)
    kept = np.flatnonzero(s == 1)
    assert kept.size == 4 and sorted(kept % 4) == [0, 1, 2, 3]


def test_similarity_leaves_dead_channels_out_unless_needed():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # channels 0-2 never fire
    data = batches((20, 3), 1, seed=2)
    g = find_prune_groups(model, data[0][:1])[0]
    assert np.flatnonzero(channel_scores("similarity", model, g, data, k=3)).tolist() == [3, 4, 5]
    s5 = channel_scores("similarity", model, g, data, k=5)
    assert s5.sum() == 5 and s5[3:].all()


def test_criteria_errors(net_and_groups):
    model, data, groups = net_and_groups
    with pytest.raises(InvalidInputError, match=r"criterion must be one of \['l1', .*\]; got 'nope'"):
        channel_scores("nope", model, groups["3"], data)
    with pytest.raises(InvalidInputError, match="criterion 'hrank' needs calibration data; got data=None"):
        channel_scores("hrank", model, groups["3"])
    with pytest.raises(InvalidInputError, match=r"k .* must be given for criterion 'similarity'; got k=None"):
        channel_scores("similarity", model, groups["3"], data)
    with pytest.raises(InvalidInputError, match="k must satisfy 1 <= k <= 6; got 7"):
        channel_scores("similarity", model, groups["3"], data, k=7)
    with pytest.raises(InvalidInputError, match="max_images must be an integer >= 1; got 0"):
        activation_statistics(model, groups["3"], data, max_images=0)


# ------------------------------------------------------------------------------- as selector methods
@pytest.mark.parametrize("criterion", ["l1", "hrank", "mean_activation", "similarity"])
def test_selector_with_a_criterion_keeps_exactly_k_and_refits(criterion, net_and_groups):
    model, data, _ = net_and_groups
    sel = ChannelSelector(criterion, sparsity=0.5, positions=4).fit(model, data)
    rows = sel.report_rows()
    assert [(r["kept"], r["total"]) for r in rows] == [(3, 6), (3, 5), (4, 7)]  # round half up
    for r in rows:
        assert r["method"] == criterion and r["bound"] is None
        assert r["rel_error"] <= r["error_no_refit"] + 1e-9  # the least-squares refit was applied
    assert sel.prune(model)(data[0]).shape == (16, 3)


def test_selector_keeps_the_top_scores(net_and_groups):
    model, data, groups = net_and_groups
    sel = ChannelSelector("l1", k={"3": 2}).fit(model, data)
    top = np.argsort(-channel_scores("l1", model, groups["3"]))[:2]
    assert np.flatnonzero(sel.get_support("3")).tolist() == sorted(top.tolist())


def test_bn_scale_needs_batchnorm_in_every_pruned_group(net_and_groups):
    model, data, _ = net_and_groups
    with pytest.raises(InvalidInputError, match=r"criterion 'bn_scale' needs an affine BatchNorm between producer "
                                                r"'3' and consumer '7'; got none"):
        ChannelSelector("bn_scale", sparsity=0.5).fit(model, data)
    sel = ChannelSelector("bn_scale", k={"3": 3}).fit(model, data)  # the group with a BatchNorm
    top = np.argsort(-model[1].weight.detach().abs().numpy())[:3]
    assert np.flatnonzero(sel.get_support("3")).tolist() == sorted(top.tolist())
