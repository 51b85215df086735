"""FLOPs / parameter budgets: the cost model, error curves, and ChannelSelector(flops=…, params=…)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mipprune.pruning.budget import cost_model, error_curve, layer_budgets
from mipprune.pruning.bridge import capture
from mipprune.data import make_loader
from mipprune.pruning.graph import find_prune_groups
from mipprune.pruning.selector import ChannelSelector
from mipprune.pruning.surgery import prune_channels
from mipprune.train import count_flops, count_params, train_digits_cnn
from solvers.budget import total_cost
from solvers.errors import InfeasibleBudgetError, InvalidInputError
from solvers.selection.select import select_channels
from tests.mipprune.conftest import conv_net


@pytest.fixture(scope="module")
def digits():
    model, data = train_digits_cnn(seed=0, epochs=2)
    return model, make_loader(data.x_train[:384], batch_size=192)


def _random_widths(groups, rng):
    return {g.consumer: int(rng.integers(1, g.n_channels + 1)) for g in groups}


def _pruned_at(model, groups, widths, example, rng):
    plan = {}
    for g in groups:
        mask = np.zeros(g.n_channels, bool)
        mask[rng.choice(g.n_channels, widths[g.consumer], replace=False)] = True
        plan[g.consumer] = (mask, None)
    return prune_channels(model, plan, example)


# ------------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("metric", ["flops", "params"])
def test_cost_model_reproduces_the_counters_of_pruned_networks(metric):
    model = conv_net()  # conv→BN→ReLU→conv→ReLU→pool→flatten→linear→ReLU→linear
    x = torch.randn(2, 3, 8, 8)
    groups = find_prune_groups(model, x[:1])
    cm = cost_model(model, groups, x, metric)
    count = (lambda m: count_flops(m, (3, 8, 8))) if metric == "flops" else count_params
    assert cm.dense == count(model) and cm.cost() == pytest.approx(cm.dense)
    rng = np.random.default_rng(0)
    flops_cm, params_cm = cost_model(model, groups, x, "flops"), cost_model(model, groups, x, "params")
    chain = layer_budgets(flops_cm, params_cm, {g.consumer: np.zeros(g.n_channels) for g in groups})
    for _ in range(4):
        widths = _random_widths(groups, rng)
        assert cm.cost(widths) == pytest.approx(count(_pruned_at(model, groups, widths, x[:1], rng)), rel=1e-12)
        # the LayerBudget chain handed to solvers.allocate_budget has the same cost
        assert total_cost(chain, [widths[L.name] for L in chain], metric) == pytest.approx(cm.cost(widths))


def test_error_curve_is_the_greedy_path(digits):
    model, calib = digits
    g = find_prune_groups(model, next(iter(calib))[0][:1])[0]
    problem = capture(model, calib, [g.consumer], columns_per_channel={g.consumer: g.columns_per_channel},
                      positions=4)[g.consumer].problem()
    curve = error_curve(problem)
    assert curve.shape == (g.n_channels,) and np.all(np.diff(curve) <= 0) and np.all((curve >= 0) & (curve <= 1))
    for k in (1, 4, 9):
        assert curve[k - 1] == pytest.approx(select_channels(problem, k=k, method="greedy").objective, abs=1e-9)
    assert curve[-1] == pytest.approx(problem.error(np.ones(g.n_channels, bool)), abs=1e-9)


# ------------------------------------------------------------------------------- selector budgets
@pytest.mark.parametrize("metric,target", [("flops", 0.5), ("params", 0.3)])
def test_budget_lands_in_the_window(metric, target, digits):
    model, calib = digits
    sel = ChannelSelector("magnitude", positions=4, **{metric: target}).fit(model, calib)
    pruned = sel.prune(model)
    achieved = (count_flops(pruned, (1, 8, 8)) / count_flops(model, (1, 8, 8)) if metric == "flops"
                else count_params(pruned) / count_params(model))
    assert 0.995 * target <= achieved <= target
    b = sel.budget_
    assert b["metric"] == metric and b["in_window"] and b["achieved_ratio"] == pytest.approx(achieved)
    assert b["predicted_ratio"] == pytest.approx(achieved)
    alloc = b["allocation"]
    assert alloc["status"] == "optimal" and alloc["bound"] <= alloc["objective"] + 1e-12
    widths = b["widths"]
    for g in sel.groups_:  # every group keeps what was allocated
        assert int(sel.get_support(g.consumer).sum()) == widths[g.consumer]
    assert sel.allocation_.widths == widths


def test_unreachable_budget_raises(digits):
    model, calib = digits
    with pytest.raises(InfeasibleBudgetError, match=r"target must be >= .* \(the smallest achievable flops ratio.*; "
                                                    r"got 0.001"):
        ChannelSelector("magnitude", flops=0.001).fit(model, calib)


@pytest.mark.parametrize("kwargs,message", [
    ({"flops": 1.5}, r"flops must be in \(0, 1\]; got 1.5"),
    ({"params": 0}, r"params must be in \(0, 1\]; got 0"),
    ({"flops": "half"}, r"flops must be a number in \(0, 1\]; got 'half'"),
    ({"flops": 0.5, "sparsity": 0.5}, "exactly one of .* must be given; got sparsity and flops"),
    ({"flops": 0.5, "budget_backend": "gurobi"}, "budget_backend must be 'highs' or 'cpsat'; got 'gurobi'"),
])
def test_budget_options_are_validated(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        ChannelSelector("magnitude", **kwargs)
