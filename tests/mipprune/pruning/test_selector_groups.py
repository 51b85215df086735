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


def test_criteria_need_pairs_and_bad_options_are_refused():
    with pytest.raises(InvalidInputError, match="criteria and tecu"):
        ChannelSelector("l1", sparsity=0.5).fit(BLOCKS["basic"]().eval(), _data())
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
