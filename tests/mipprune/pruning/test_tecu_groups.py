"""TECU over channel groups (mipprune.pruning.tecu_groups): the sequential pass first, a monotone
end-to-end objective, shared consumers, budgets, ChannelSelector("tecu") on graph models, bad input."""
from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

import mipprune.pruning.tecu as tecu_module
from mipprune.pruning.channel_graph import build_channel_graph
from mipprune.pruning.group_pruning import group_targets, prune_by_groups
from mipprune.pruning.selector import ChannelSelector
from mipprune.pruning.tecu import EndToEndObjective
from mipprune.pruning.tecu_groups import tecu_groups
from solvers.errors import InvalidInputError
from solvers.selection.baselines import result_from_mask
from tests.mipprune.pruning.blocks import BLOCKS, MixedWide

pytestmark = pytest.mark.usefixtures("one_thread")

# greedy blocks (+ 1-swap local search) with short sub-solves: each run takes about a second
FAST = dict(positions=6, exact_max_channels=0, time_limit=0.1)


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _decreasing(values) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


@pytest.fixture(scope="module")
def mixed():
    """Residual stream + depthwise + grouped conv (MixedWide), half of every group's units."""
    model, data = MixedWide().eval(), _data()
    example = data[0][:1]
    graph = build_channel_graph(model, example)
    targets = group_targets(graph.prunable, sparsity=0.5)
    torch.set_num_threads(1)
    out = tecu_groups(model, data, example, targets, graph=graph, max_iter=2, **FAST)
    return model, data, example, graph, targets, out


def test_iteration_0_is_the_sequential_pass_and_the_objective_never_increases(mixed):
    model, data, example, graph, targets, out = mixed
    score = EndToEndObjective(model, data)
    assert out.history[0]["solver"] == "greedy"
    seq = prune_by_groups(model, data, example, targets, method="greedy", graph=graph, positions=6)
    values = [h["objective"] for h in out.history]
    assert values[0] == pytest.approx(score(seq.model), rel=1e-12)
    for name, mask in seq.masks.items():
        np.testing.assert_array_equal(out.initial.masks[name], mask)
    assert _decreasing(values) and len(values) >= 2
    assert score(out.model) == pytest.approx(values[-1], rel=1e-9)  # the recorded value is the returned model's
    for h in out.history[1:]:
        if not h["accepted"] and not h["refitted"]:
            assert h["objective"] == out.history[h["iteration"] - 1]["objective"]
    # widths stay fixed; the residual stream's kept set is the same in every member
    for name, k in targets.items():
        assert out.masks[name].sum() == k
    stream = next(g for g in graph.prunable if "project.0" in g.name)
    head = dict(out.model.named_modules())
    assert head["stem.0"].out_channels == head["project.0"].out_channels == head["head"].in_channels \
        == out.masks[stream.name].sum()
    for name, res in out.results.items():
        assert res.method == "tecu" and res.k == targets[name]
        assert res.bound is None or res.bound <= res.objective + 1e-12
        for err in out.rows[name]["consumer_errors"].values():
            assert 0 <= err <= 1


def test_tecu_beats_lasso_and_greedy_at_the_same_widths(mixed):
    model, data, example, graph, targets, out = mixed
    score = EndToEndObjective(model, data)
    others = {m: score(prune_by_groups(model, data, example, targets, method=m, graph=graph, positions=6).model)
              for m in ("lasso", "greedy")}
    final = out.history[-1]["objective"]
    assert final <= min(others.values())
    assert final < 0.9 * others["greedy"]  # a real improvement on its own starting point here
    assert sum(len(h["accepted"]) for h in out.history[1:]) >= 1


def test_rejected_candidates_leave_the_objective_unchanged(monkeypatch):
    """A misleading sub-solver (random units claimed to have zero error) after iteration 0: every
    candidate is scored end to end and the worse ones are rejected."""
    model, data = MixedWide().eval(), _data()
    rng = np.random.default_rng(0)

    def noisy(problem, k, solver, tau, eps, eps_min, t, current, backend, seed):
        mask = problem.mask_from_support(rng.choice(problem.n_channels, size=k, replace=False))
        return dataclasses.replace(result_from_mask(problem, mask, method="random", start=0.0), objective=0.0), False

    monkeypatch.setattr(tecu_module, "_sub_solve", noisy)
    graph = build_channel_graph(model, data[0][:1])
    targets = group_targets(graph.prunable, sparsity=0.5)
    # τ_max above τ_3: the descent runs all iterations although nothing is accepted (the noisy solver takes no time)
    out = tecu_groups(model, data, data[0][:1], targets, graph=graph, max_iter=3, **dict(FAST, time_limit=None))
    values = [h["objective"] for h in out.history]
    assert len(values) == 4 and _decreasing(values)
    assert sum(len(h["rejected"]) for h in out.history) >= 3
    assert EndToEndObjective(model, data)(out.model) == pytest.approx(values[-1], rel=1e-9)
    for res in out.results.values():
        if res.info.get("refitted"):
            assert res.bound is None


def test_shared_consumer_of_a_concat_is_refitted_on_all_its_kept_columns():
    """DenseTiny: conv_b reads cat(stem, conv_a) and transition cat(stem, conv_a, conv_b)."""
    model, data = BLOCKS["dense"]().eval(), _data()
    graph = build_channel_graph(model, data[0][:1])
    targets = group_targets(graph.prunable, sparsity=0.5)
    out = tecu_groups(model, data, data[0][:1], targets, graph=graph, max_iter=1, positions=6)
    assert out.history[0]["solver"] == "exact"
    mods = dict(out.model.named_modules())
    kept = {n: int(out.masks[n].sum()) for n in ("stem", "conv_a", "conv_b")}
    assert mods["conv_b"].in_channels == kept["stem"] + kept["conv_a"]
    assert mods["transition"].in_channels == sum(kept.values())
    assert set(out.rows["stem"]["consumer_errors"]) == {"conv_a", "conv_b", "transition"}
    assert out.rows["stem"]["consumer_columns"]["conv_b"] == 9 * (kept["stem"] + kept["conv_a"])
    assert _decreasing([h["objective"] for h in out.history])


def test_selector_tecu_on_a_residual_model_fills_history_and_reports():
    model = BLOCKS["basic"]().eval()  # BasicBlocks with one ReLU called twice: a merged residual stream
    before = copy.deepcopy(model.state_dict())
    data = _data()
    sel = ChannelSelector("tecu", sparsity=0.5, max_iter=1, positions=6, time_limit=0.1).fit(model, data)
    assert sel.graph_ is not None
    values = [h["objective"] for h in sel.tecu_history_]
    assert 1 <= len(values) <= 2 and _decreasing(values)
    assert EndToEndObjective(model, data)(sel.pruned_model_) == pytest.approx(values[-1], rel=1e-9)
    rows = sel.report_rows()
    assert rows and all(r["method"] == "tecu" for r in rows)
    assert {r["layer"] for r in rows} == set(sel.results_)
    text = str(sel.report())
    assert "TECU end-to-end objective per iteration" in text and "block-coordinate" in text
    replay = sel.prune(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(replay(data[1]), sel.pruned_model_(data[1]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_flops_budget_lands_in_the_window_with_the_budget_widths():
    model, data = MixedWide().eval(), _data()
    sel = ChannelSelector("tecu", flops=0.6, max_iter=1, **FAST).fit(model, data)
    b = sel.budget_
    assert b["in_window"] and b["window"][0] <= b["achieved_ratio"] <= 0.6 + 1e-12
    for name, res in sel.results_.items():
        assert res.k == b["widths"][name]


def test_bad_input_is_refused():
    model, data = MixedWide().eval(), _data()
    example = data[0][:1]
    graph = build_channel_graph(model, example)
    name = graph.prunable[0].name
    n = graph.prunable[0].n_units
    with pytest.raises(InvalidInputError, match="targets must name prunable groups"):
        tecu_groups(model, data, example, {"nope": 2}, graph=graph)
    with pytest.raises(InvalidInputError, match=re.escape(f"targets[{name!r}] must be an integer in [1, {n}]")):
        tecu_groups(model, data, example, {name: 0}, graph=graph)
    with pytest.raises(InvalidInputError, match="targets must prune at least one channel group"):
        tecu_groups(model, data, example, {name: n}, graph=graph)
    with pytest.raises(InvalidInputError, match="max_iter must be an integer >= 0; got -1"):
        tecu_groups(model, data, example, {name: 2}, graph=graph, max_iter=-1)
    with pytest.raises(InvalidInputError, match="objective must be one of"):
        tecu_groups(model, data, example, {name: 2}, graph=graph, objective="nope")
    with pytest.raises(InvalidInputError, match="gaps must satisfy"):
        tecu_groups(model, data, example, {name: 2}, graph=graph, base_gap=2.0)
    with pytest.raises(InvalidInputError, match="exact_max_channels must be an integer >= 0"):
        tecu_groups(model, data, example, {name: 2}, graph=graph, exact_max_channels=-1)
    with pytest.raises(InvalidInputError, match=r"objective 'task' needs labelled batches \(x, y\); got inputs only"):
        ChannelSelector("tecu", sparsity=0.5, objective="task", max_iter=0).fit(model, data)


def test_task_objective_on_groups_uses_the_labels():
    model, data = BLOCKS["dense"]().eval(), _data()
    labelled = [(x, torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(i)))
                for i, x in enumerate(data)]
    sel = ChannelSelector("tecu", sparsity=0.5, objective="task", max_iter=1, **FAST).fit(model, labelled)
    values = [h["objective"] for h in sel.tecu_history_]
    assert _decreasing(values)
    ce = EndToEndObjective(model, labelled, "task")(sel.pruned_model_)
    assert ce == pytest.approx(values[-1], rel=1e-9) and ce > 0
