"""TECU (mipprune.pruning.tecu): monotone end-to-end objective, acceptance rule, certificates, options."""
from __future__ import annotations

import copy
import dataclasses
import numpy as np
import pytest
import torch

import mipprune.pruning.tecu as tecu_module
from mipprune.pruning.graph import find_prune_groups
from mipprune.pruning.selector import ChannelSelector
from mipprune.pruning.tecu import EndToEndObjective, tecu
from solvers.selection.baselines import result_from_mask
from solvers.errors import InvalidInputError
from tests.mipprune.conftest import batches, conv_net


@pytest.fixture(scope="module")
def setup():
    model = conv_net()
    data = batches((32, 3, 8, 8), 2, seed=7)
    groups = find_prune_groups(model, data[0][:1])
    return model, data, groups


def _decreasing(values) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


def test_tecu_objective_never_increases_and_describes_the_returned_model(setup):
    model, data, groups = setup
    sel = ChannelSelector("tecu", sparsity=0.5, positions=6, max_iter=3).fit(model, data)
    hist = sel.tecu_history_
    assert hist[0]["iteration"] == 0 and 1 <= len(hist) <= 4
    values = [h["objective"] for h in hist]
    assert _decreasing(values) and all(np.isfinite(values))
    # the recorded objective is the returned network's end-to-end error
    assert EndToEndObjective(model, data)(sel.pruned_model_) == pytest.approx(values[-1], rel=1e-9)
    # tolerances tighten geometrically
    assert _decreasing([h["gap_tolerance"] for h in hist]) and hist[0]["gap_tolerance"] == pytest.approx(0.05)
    # replaying the stored masks and weights on a copy of the model rebuilds the same network
    replay = sel.prune(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(replay(data[0]), sel.pruned_model_(data[0]))
    rows = sel.report_rows()
    assert [(r["kept"], r["total"]) for r in rows] == [(3, 6), (3, 5), (4, 7)]
    assert all(r["method"] == "tecu" for r in rows)
    for r in rows:  # a reported bound is a certificate: below the objective
        assert r["bound"] is None or r["bound"] <= r["rel_error"] + 1e-12


def test_rejected_updates_leave_the_objective_unchanged(setup, monkeypatch):
    """A misleading sub-solver (random channels claimed to have zero local error) after iteration 0:
    every candidate is scored end to end and the worse ones are rejected."""
    model, data, groups = setup
    real = tecu_module._sub_solve
    rng = np.random.default_rng(0)

    def noisy(problem, k, solver, tau, eps, eps_min, t, current, backend, seed):
        if t == 0:
            return real(problem, k, solver, tau, eps, eps_min, t, current, backend, seed)[0], False
        mask = problem.mask_from_support(rng.choice(problem.n_channels, size=k, replace=False))
        return dataclasses.replace(result_from_mask(problem, mask, method="random", start=0.0), objective=0.0), False

    monkeypatch.setattr(tecu_module, "_sub_solve", noisy)
    targets = {g.consumer: max(1, g.n_channels // 2) for g in groups}
    out = tecu(model, data, groups, targets, example=data[0][:1], max_iter=4, positions=6)
    values = [h["objective"] for h in out.history]
    assert len(out.history) == 5 and _decreasing(values)
    assert sum(len(h["rejected"]) for h in out.history) >= 1
    for h in out.history[1:]:
        if not h["accepted"]:
            assert h["objective"] == out.history[h["iteration"] - 1]["objective"]
    assert EndToEndObjective(model, data)(out.model) == pytest.approx(values[-1], rel=1e-9)
    for c, res in out.results.items():  # refitted blocks carry no stale certificate
        assert res.k == targets[c] and res.method == "tecu"
        if res.info.get("refitted"):
            assert res.bound is None


def test_task_objective_needs_labels_and_uses_them(setup):
    model, data, groups = setup
    with pytest.raises(InvalidInputError, match=r"objective 'task' needs labelled batches \(x, y\); got inputs only"):
        ChannelSelector("tecu", sparsity=0.5, objective="task", max_iter=0).fit(model, data)
    labelled = [(x, torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(i)))
                for i, x in enumerate(data)]
    sel = ChannelSelector("tecu", k={"3": 3}, objective="task", max_iter=1, positions=6).fit(model, labelled)
    values = [h["objective"] for h in sel.tecu_history_]
    assert _decreasing(values)
    ce = EndToEndObjective(model, labelled, "task")(sel.pruned_model_)
    assert ce == pytest.approx(values[-1], rel=1e-9) and ce > 0


def test_max_iter_zero_is_the_sequential_pass_and_options_are_checked(setup):
    model, data, groups = setup
    sel = ChannelSelector("tecu", sparsity=0.5, max_iter=0, positions=6).fit(model, data)
    assert len(sel.tecu_history_) == 1
    with pytest.raises(InvalidInputError, match="max_iter must be an integer >= 0; got -1"):
        ChannelSelector("tecu", sparsity=0.5, max_iter=-1)
    with pytest.raises(InvalidInputError, match="objective must be 'output' or 'task'; got 'nope'"):
        ChannelSelector("tecu", sparsity=0.5, objective="nope")
    with pytest.raises(InvalidInputError, match="targets must name at least one prune group; got none"):
        tecu(model, data, groups, {}, example=data[0][:1])


def test_embedded_solver_is_chosen_by_block_size():
    assert tecu_module.embedded_solver(16, exact_max_channels=64) == "exact"
    assert tecu_module.embedded_solver(65, exact_max_channels=64) == "greedy"
    assert tecu_module.embedded_solver(2048, exact_max_channels=64) == "lasso"
    assert tecu_module.embedded_solver(100, exact_max_channels=64, greedy_max_channels=50) == "lasso"


def test_loose_sub_solves_are_not_called_optimal():
    """At iteration t the exact block solve certifies only ε_t: the gap is kept, OPTIMAL is not."""
    from tests.solvers.selection.bank import make_problem

    problem = make_problem(12, 2, 3, 300, seed=1)
    res, final = tecu_module._sub_solve(problem, 4, "exact", 10.0, 0.5, 1e-12, 0, None, None, 0)
    assert not final and res.status.value != "optimal" and res.gap is not None
    res, final = tecu_module._sub_solve(problem, 4, "exact", 10.0, 1e-6, 1e-6, 3, None, None, 0)
    assert final and res.status.value == "optimal" and res.gap <= 1e-6
    for solver in ("greedy", "lasso"):
        res, _ = tecu_module._sub_solve(problem, 4, solver, 1.0, 0.05, 1e-4, 0, None, None, 0)
        assert res.k == 4 and res.bound is None
