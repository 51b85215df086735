"""Baseline criteria on transformer sites (mipprune.pruning.transformer_criteria)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from mipprune.pruning.transformer_criteria import TRANSFORMER_CRITERIA, flap_bias, standardize, unit_scores
from mipprune.pruning.transformer_sites import Site
from solvers.errors import InvalidInputError


def _site(n_units: int, unit_columns: int, kind: str = "heads") -> Site:
    return Site(kind=kind, name="blk.attn", block="blk", consumer="blk.attn.o", n_units=n_units,
                unit_columns=unit_columns, params_per_unit=1, flops_per_unit=lambda L: 1,
                apply=lambda *a: None)


# Two heads of two columns each; rows of W are the consumer's input columns (bridge layout).
W = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
Z = np.array([[1.0, 0.0, 2.0, 0.0], [1.0, 2.0, 0.0, 0.0]])


def _stats(z):
    return z.T @ z, z.mean(axis=0), z.shape[0]


def test_magnitude_tp_hand_computed():
    site = _site(2, 2)
    # squared column norms 1, 4, 9, 0 → head means 2.5, 4.5 → divided by their mean 3.5
    np.testing.assert_allclose(unit_scores("magnitude_tp", site, weight=W), [5 / 7, 9 / 7])
    # a producer with rows ‖·‖² 1, 1, 4, 0 → head means 1, 2; members averaged: 1.75, 3.25; mean 2.5
    q = np.array([[1.0, 0, 0], [0, 1.0, 0], [2.0, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(unit_scores("magnitude_tp", site, weight=W, producer_weights=[q]), [0.7, 1.3])


def test_magnitude_tp_kv_groups_take_blocks_of_rows():
    site = _site(2, 4)  # GQA: 2 kv groups, 2 q heads of head_dim 2 each
    w = np.ones((8, 3))
    k = np.array([[1.0], [1.0], [3.0], [1.0]])  # 2 k rows per group: means 1 and 5
    s = unit_scores("magnitude_tp", site, weight=w, producer_weights=[k])
    raw = np.array([(3 + 1) / 2, (3 + 5) / 2])
    np.testing.assert_allclose(s, raw / raw.mean())


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="torch-pruning not on the path")
def test_magnitude_tp_matches_torch_pruning_on_neurons():
    import torch_pruning as tp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3))
    group = dg.get_pruning_group(net[0], tp.prune_linear_out_channels, idxs=list(range(5)))
    ref = tp.importance.GroupMagnitudeImportance(p=2)(group).double().numpy()
    ours = unit_scores("magnitude_tp", _site(5, 1, "neurons"), weight=net[2].weight.detach().double().T.numpy(),
                       producer_weights=[net[0].weight.detach().double().numpy()])
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_wanda_sp_hand_computed():
    gram, mean, n = _stats(Z)
    # ‖X_j‖ = √2, 2, 2, 0; Σ_i |W_ij| = 1, 2, 3, 0
    s = unit_scores("wanda_sp", _site(2, 2), weight=W, gram=gram, mean=mean, n_samples=n)
    np.testing.assert_allclose(s, [np.sqrt(2) + 4, 6])


def test_flap_hand_computed_and_constant_columns_score_zero():
    gram, mean, n = _stats(Z)
    # Var = 0, 1, 1, 0 (column 0 is constant); ‖W_j‖² = 1, 4, 9, 0
    s = unit_scores("flap", _site(2, 2), weight=W, gram=gram, mean=mean, n_samples=n)
    np.testing.assert_allclose(s, [4, 9])
    z = np.column_stack([np.full(6, 3.0), np.arange(6.0)])
    g, m, k = _stats(z)
    s = unit_scores("flap", _site(2, 1, "neurons"), weight=np.ones((2, 3)), gram=g, mean=m, n_samples=k)
    assert s[0] == 0 and s[1] == pytest.approx(3 * np.var(np.arange(6.0)))


def test_scores_have_one_float_per_unit():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 12))
    gram, mean, n = _stats(z)
    for method in TRANSFORMER_CRITERIA:
        s = unit_scores(method, _site(3, 4), weight=rng.normal(size=(12, 5)), gram=gram, mean=mean, n_samples=n)
        assert s.shape == (3,) and s.dtype == np.float64 and np.all(np.isfinite(s)) and np.all(s >= 0)


def test_flap_bias_equals_the_mean_output_change_of_removing_columns():
    rng = np.random.default_rng(1)
    site = _site(4, 3)
    z = rng.normal(loc=0.7, size=(200, 12))
    w = rng.normal(size=(12, 6))
    keep = np.array([0, 2])
    cols = np.repeat(np.isin(np.arange(4), keep), 3)
    delta = flap_bias(site, keep, w, z.mean(axis=0))
    full, pruned = z @ w, z[:, cols] @ w[cols]
    np.testing.assert_allclose(delta, (full - pruned).mean(axis=0), atol=1e-12)
    # with the delta as bias, the pruned layer's mean output equals the dense one's
    np.testing.assert_allclose((pruned + delta).mean(axis=0), full.mean(axis=0), atol=1e-12)
    assert np.allclose(flap_bias(site, np.arange(4), w, z.mean(axis=0)), 0)


def test_standardize():
    s = standardize([1.0, 2.0, 3.0])
    np.testing.assert_allclose(s, [-1, 0, 1])
    np.testing.assert_array_equal(standardize([2.0, 2.0]), [0, 0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="l1"), r"method must be one of \['magnitude_tp', 'wanda_sp', 'flap'\]; got 'l1'"),
    (dict(weight=np.ones((3, 2))), r"weight of site 'blk.attn' must have shape \(4, m\); got \(3, 2\)"),
    (dict(weight=np.ones(4)), r"weight of site 'blk.attn' must have shape \(4, m\); got \(4,\)"),
    (dict(gram=np.ones((4, 3))), r"gram of site 'blk.attn' must have shape \(4, 4\); got \(4, 3\)"),
    (dict(gram=None), r"gram must be given \(shape \(4, 4\)\)"),
    (dict(mean=np.ones(5)), r"mean of site 'blk.attn' must have shape \(4,\); got \(5,\)"),
    (dict(n_samples=0), r"n_samples must be an int >= 1 .*; got 0"),
    (dict(n_samples=True), r"n_samples must be an int >= 1"),
    (dict(weight=np.full((4, 2), np.nan)), r"weight must be finite"),
    (dict(producer_weights=[np.ones((4, 2))]), r"producer_weights is only read by 'magnitude_tp'; got it with 'flap'"),
])
def test_bad_input_is_an_invalid_input_error(kwargs, match):
    gram, mean, n = _stats(Z)
    args = dict(method="flap", weight=W, gram=gram, mean=mean, n_samples=n) | kwargs
    method = args.pop("method")
    with pytest.raises(InvalidInputError, match=match):
        unit_scores(method, _site(2, 2), **args)


def test_bad_sites_keeps_and_producers_are_invalid_input_errors():
    with pytest.raises(InvalidInputError, match=r"site must be a mipprune.pruning.transformer_sites.Site; got str"):
        unit_scores("magnitude_tp", "blk", weight=W)
    with pytest.raises(InvalidInputError, match=r"producer_weights\[0\] .* multiple of n_units = 2; got shape \(3, 2\)"):
        unit_scores("magnitude_tp", _site(2, 2), weight=W, producer_weights=[np.ones((3, 2))])
    mean = np.zeros(4)
    with pytest.raises(InvalidInputError, match=r"keep must hold unit indices in \[0, 2\); got 0..2"):
        flap_bias(_site(2, 2), np.array([0, 2]), W, mean)
    with pytest.raises(InvalidInputError, match=r"keep must not repeat a unit"):
        flap_bias(_site(2, 2), np.array([1, 1]), W, mean)
    with pytest.raises(InvalidInputError, match=r"keep must be a 1-D array of unit indices"):
        flap_bias(_site(2, 2), np.array([0.5]), W, mean)
    with pytest.raises(InvalidInputError, match=r"mean of site 'blk.attn' must have shape \(4,\)"):
        flap_bias(_site(2, 2), np.array([0]), W, np.zeros(3))
    with pytest.raises(InvalidInputError, match=r"scores must be a 1-D array of at least 2 values"):
        standardize([1.0])
