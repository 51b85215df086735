"""ChannelSelector over channel groups (residual, depthwise + SE, concat): fit, report, prune, budgets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mipprune.pruning.selector import ChannelSelector
from solvers.errors import InfeasibleBudgetError, InvalidInputError, UnsupportedLayerError
from tests.mipprune.pruning.blocks import BLOCKS

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", ["basic", "inverted", "dense"])
def test_auto_mode_prunes_merged_groups_and_reports_them(name):
    model = BLOCKS[name]().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = ChannelSelector("greedy", sparsity=0.5).fit(model, _data())
    assert sel.graph_ is not None and sel.groups_
    rows = sel.report_rows()
    assert {r["layer"] for r in rows} == {g.name for g in sel.groups_ if g.n_units > 1}
    for r in rows:
        assert r["kept"] == max(1, int(r["total"] * 0.5 + 0.5)) and 0 <= r["rel_error"] <= 1 + 1e-9
        assert r["consumers"] and r["memory"] > 0
    g0 = sel.groups_[0]
    assert sel.get_support(g0.name).shape == (g0.n_units,)
    assert sel.get_support(g0.producers[0].module).sum() == sel.get_support(g0.name).sum()
    text = str(sel.report())
    assert "kept whole" in text and "network output" in text
    pruned = sel.prune(model)
    masked = sel.prune(model, reconstruct=False)
    x = _data(1, seed=5)[0]
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == masked(x).shape
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_pair_models_keep_the_pair_analysis(conv_model, conv_input):
    sel = ChannelSelector("greedy", sparsity=0.5).fit(conv_model, [conv_input])
    assert sel.graph_ is None and hasattr(sel.groups_[0], "consumer")


def test_flops_budget_over_groups_and_the_floor():
    model = BLOCKS["bottleneck"]().eval()
    sel = ChannelSelector("greedy", flops=0.6).fit(model, _data())
    b = sel.budget_
    assert b["achieved_ratio"] <= 0.6 + 1e-12 and b["achieved_ratio"] == pytest.approx(b["predicted_ratio"])
    with pytest.raises(InfeasibleBudgetError, match="flops must be >="):
        ChannelSelector("greedy", flops=b["floor"] / 2).fit(model, _data())


def test_transformer_criteria_and_bad_options_are_refused_over_groups():
    # (tecu over channel groups: tests/mipprune/pruning/test_tecu_groups.py)
    with pytest.raises(InvalidInputError, match=r"method must be one of .*'tecu'.*got 'wanda_sp'"):
        ChannelSelector("wanda_sp", sparsity=0.5).fit(BLOCKS["basic"]().eval(), _data())
    with pytest.raises(InvalidInputError, match="groups must be one of"):
        ChannelSelector(sparsity=0.5, groups="all")
    with pytest.raises(InvalidInputError, match="max_memory"):
        ChannelSelector(sparsity=0.5, max_memory=-1)


def test_nothing_prunable_names_the_blockers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2))
    model2 = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.PixelShuffle(1), torch.nn.Conv2d(2, 2, 3))
    with pytest.raises(UnsupportedLayerError, match=r"PixelShuffle"):
        ChannelSelector("greedy", sparsity=0.5, groups="graph").fit(model2, _data())
    assert ChannelSelector("greedy", sparsity=0.5).fit(model, _data()).graph_ is None


@pytest.mark.parametrize("metric,target", [("flops", 0.5), ("params", 0.6)])
def test_budget_over_groups_lands_in_the_window(metric, target):
    from tests.mipprune.pruning.blocks import BottleneckWide

    model = BottleneckWide().eval()
    sel = ChannelSelector("greedy", **{metric: target}, positions=4).fit(model, _data(2))
    b = sel.budget_
    assert b["in_window"] and 0.995 * target <= b["achieved_ratio"] <= target
    assert b["achieved_ratio"] == pytest.approx(b["predicted_ratio"])
    assert f"{metric} budget" in str(sel.report())


def test_auto_mode_with_nothing_prunable_names_the_blockers():
    class Roll(torch.nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Roll(), torch.nn.Conv2d(4, 2, 3))
    with pytest.raises(UnsupportedLayerError, match=r"0: .*roll"):
        ChannelSelector("greedy", sparsity=0.5).fit(model, _data())


def test_report_warns_when_a_consumer_has_fewer_rows_than_columns():
    model = BLOCKS["basic"]().eval()
    sel = ChannelSelector("greedy", sparsity=0.5, positions=1).fit(model, [torch.randn(2, 3, 8, 8)])
    assert "fewer calibration rows than columns" in str(sel.report())


def test_flops_budget_on_residual_depthwise_grouped_model_is_exact_and_proven():
    from torch.utils.flop_counter import FlopCounterMode

    from tests.mipprune.pruning.blocks import MixedWide

    model = MixedWide().eval()
    x = _data(1, seed=3)[0][:1]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    dense_flops = counter.get_total_flops()
    for t in (0.35, 0.6):
        sel = ChannelSelector("greedy", flops=t, positions=4).fit(model, _data(2))
        b, a = sel.budget_, sel.budget_["allocation"]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            sel.pruned_model_(x)
        ratio = counter.get_total_flops() / dense_flops  # torch's own count (2 per MAC), not ours
        assert 0.995 * t <= ratio <= t and ratio == pytest.approx(b["predicted_ratio"], rel=1e-12)
        assert a["status"] == "optimal" and a["gap"] is not None and a["gap"] <= 1e-5
        assert a["bound"] <= a["objective"] + 1e-12
        assert "HiGHS MILP optimal" in " ".join(str(sel.report()).split())
    with pytest.raises(InvalidInputError, match="budget_backend"):
        ChannelSelector("greedy", flops=0.5, budget_backend="cpsat").fit(model, _data(1))


@pytest.mark.parametrize("criterion", ["l1", "bn_scale", "hrank", "mean_activation", "similarity"])
@pytest.mark.parametrize("name", ["basic", "inverted", "dense", "resnext"])
def test_criteria_prune_merged_groups_and_refit_on_the_joint_problem(criterion, name):
    from mipprune.pruning.channel_graph import build_channel_graph

    model = BLOCKS[name]().eval()
    graph = build_channel_graph(model, _data(1)[0])
    if criterion == "bn_scale" and not all(any(m.role == "batchnorm" for m in g.members) for g in graph.prunable):
        with pytest.raises(InvalidInputError, match="needs an affine BatchNorm in group"):
            ChannelSelector(criterion, sparsity=0.5).fit(model, _data(2))
        return
    sel = ChannelSelector(criterion, sparsity=0.5).fit(model, _data(2))
    assert sel.graph_ is not None
    rows = sel.report_rows()
    assert rows and all(r["method"] == criterion for r in rows)
    for r in rows:
        assert r["kept"] == max(1, int(r["total"] * 0.5 + 0.5))
        assert 0 <= r["rel_error"] <= 1 + 1e-9 and r["rel_error"] <= r["error_no_refit"] + 1e-9  # refit helps
    with torch.no_grad():
        assert torch.isfinite(sel.prune(model)(_data(1, seed=4)[0])).all()


def test_group_scores_sum_over_producers_and_match_pair_scores(conv_model, conv_input):
    from mipprune.pruning.channel_graph import build_channel_graph
    from mipprune.pruning.criteria import CRITERIA, channel_scores, group_scores
    from mipprune.pruning.graph import find_prune_groups

    # a single producer with one channel per unit: the group score is the pair score
    data = [conv_input]
    pairs = {g.producer: g for g in find_prune_groups(conv_model, conv_input[:1])}
    for g in build_channel_graph(conv_model, conv_input[:1]).prunable:
        pg = pairs[g.producers[0].module]
        for c in CRITERIA:
            if c == "bn_scale" and not pg.batchnorms:
                continue
            np.testing.assert_allclose(group_scores(c, conv_model, g, data, k=2),
                                       channel_scores(c, conv_model, pg, data, k=2), rtol=1e-12)
    # a residual stream: l1 sums the unit's filter norms over every producer writing it
    model = BLOCKS["basic"]().eval()
    graph = build_channel_graph(model, _data(1)[0])
    g = next(g for g in graph.prunable if len(g.producers) == 3)
    mods = dict(model.named_modules())
    by_hand = sum(mods[m.module].weight.detach().double().abs().sum((1, 2, 3)).numpy() for m in g.producers)
    np.testing.assert_allclose(group_scores("l1", model, g), by_hand, rtol=1e-12)
    bn = sum(mods[m.module].weight.detach().abs().double().numpy() for m in g.members if m.role == "batchnorm")
    np.testing.assert_allclose(group_scores("bn_scale", model, g), bn, rtol=1e-12)
    # a unit whose filters are zero in every producer has no activation of its own: scored last
    dead = 2
    with torch.no_grad():
        for m in g.producers:
            mods[m.module].weight[dead] = 0
        for m in g.members:
            if m.role == "batchnorm":
                mods[m.module].bias[dead] = -10.0  # dead after the ReLU as well
    assert int(np.argmin(group_scores("l1", model, g))) == dead
    sel = ChannelSelector("l1", k={g.name: g.n_units - 1}).fit(model, _data(2))
    assert not sel.get_support(g.name)[dead] and sel.get_support(g.name).sum() == g.n_units - 1


def test_bn_scale_on_a_group_without_batchnorm_names_the_alternative():
    from tests.mipprune.pruning.blocks import BottleneckWide

    with pytest.raises(InvalidInputError, match=r"bn_scale.*BatchNorm in group 'stem'.*'l1'"):
        ChannelSelector("bn_scale", sparsity=0.5, groups="graph").fit(BottleneckWide().eval(), _data(1))


def test_report_shows_the_memory_estimate_and_the_plan():
    from mipprune.pruning.group_pruning import statistics_bytes
    from tests.mipprune.pruning.blocks import BottleneckWide

    model = BottleneckWide().eval()
    sel = ChannelSelector("greedy", sparsity=0.5, positions=2, max_memory=2**30).fit(model, _data(1))
    text = " ".join(str(sel.report()).split())
    assert "statistics memory, estimated before allocation (max_memory 1.00 GiB)" in text
    g = next(g for g in sel.groups_ if g.name == "block.conv1")
    assert f"block.conv1 {statistics_bytes(model, g) / 2**20:.1f} MiB (Grams)" in text
