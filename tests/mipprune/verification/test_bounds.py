"""Bounds: sound on sampled inputs, CROWN ⊆ interval, LP ⊆ CROWN, exact L1 concretization."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from solvers.network.spec import Region, make_region
from mipprune.verification.bounds import compute_bounds, concretize_argmin, concretize_lower, linear_lower_bound, lp_linear_lower_bound
from solvers.errors import InvalidInputError
from solvers.network.layers import Dense, ReLU
from solvers.network.ir import Network


def random_net(rng, sizes, bias_scale=0.3) -> Network:
    layers = []
    for i in range(len(sizes) - 1):
        W = rng.normal(size=(sizes[i + 1], sizes[i])) / np.sqrt(sizes[i])
        layers.append(Dense(W, rng.normal(size=sizes[i + 1]) * bias_scale))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return Network(layers, (sizes[0],))


def sample_region(rng, lo, hi, n, center=None, radius=None):
    X = rng.uniform(lo, hi, size=(n, lo.size))
    # also the box corners' neighbourhood: extreme points matter most for bounds
    X[: n // 4] = np.where(rng.random((n // 4, lo.size)) < 0.5, lo, hi)
    if center is not None:
        X = X[np.abs(X - center).sum(axis=1) <= radius]
    return X


def preactivations(net: Network, X) -> list[np.ndarray]:
    acts = net.activations(X)
    return [a.reshape(len(X), -1) for a, layer in zip(acts[1:], net.layers) if isinstance(layer, Dense)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.floats(0.05, 2.0), use_l1=st.booleans())
def test_every_method_bounds_all_sampled_preactivations(seed, width, use_l1):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [3, 6, 5, 2])
    c = rng.normal(size=3)
    lo, hi = c - width, c + width
    kw = {"l1_center": c, "l1_radius": width * 1.2} if use_l1 else {}
    X = sample_region(rng, lo, hi, 400, c if use_l1 else None, width * 1.2)
    pre = preactivations(net, X)
    results = {m: compute_bounds(net, lo, hi, m, **kw) for m in ("interval", "crown", "lp")}
    for m, b in results.items():
        assert b.method == m and b.n_layers == 3
        for i, z in enumerate(pre):
            assert np.all(z >= b.lower[i] - 1e-9), f"{m}: lower bound of block {i} violated"
            assert np.all(z <= b.upper[i] + 1e-9), f"{m}: upper bound of block {i} violated"
    for i in range(3):   # each method at least as tight as the previous one, neuron by neuron
        assert np.all(results["crown"].lower[i] >= results["interval"].lower[i] - 1e-12)
        assert np.all(results["crown"].upper[i] <= results["interval"].upper[i] + 1e-12)
        assert np.all(results["lp"].lower[i] >= results["crown"].lower[i] - 1e-12)
        assert np.all(results["lp"].upper[i] <= results["crown"].upper[i] + 1e-12)


def test_crown_and_lp_are_strictly_tighter_somewhere():
    rng = np.random.default_rng(3)
    net = random_net(rng, [4, 10, 10, 3])
    lo, hi = -np.ones(4), np.ones(4)
    w = {m: sum((b.upper[i] - b.lower[i]).sum() for i in range(3))
         for m, b in ((m, compute_bounds(net, lo, hi, m)) for m in ("interval", "crown", "lp"))}
    assert w["crown"] < w["interval"] and w["lp"] < w["crown"]


def test_margin_bound_is_sound_and_beats_differencing_output_bounds():
    rng = np.random.default_rng(1)
    net = random_net(rng, [4, 8, 8, 3])
    lo, hi = -0.5 * np.ones(4), 0.5 * np.ones(4)
    b = compute_bounds(net, lo, hi, "crown")
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, -1.0]])
    lb, pts = linear_lower_bound(net, b, C, lower=lo, upper=hi, return_points=True)
    Y = net.forward(sample_region(rng, lo, hi, 2000))
    assert np.all(Y @ C.T >= lb - 1e-9)
    diff = np.maximum(C, 0) @ b.lower[-1] + np.minimum(C, 0) @ b.upper[-1]
    assert np.all(lb >= diff - 1e-12) and np.any(lb > diff + 1e-6)
    assert pts.shape == (3, 4) and np.all((pts >= lo) & (pts <= hi))
    lp_lb, X = lp_linear_lower_bound(net, b, C, region=make_region(4, lo, hi))
    assert np.all(lp_lb >= lb - 1e-12)
    # the LP optimum's input is a real input: its true margin is >= the bound
    assert np.all(np.einsum("ij,ij->i", net.forward(X), C) >= lp_lb - 1e-7)


@pytest.mark.parametrize("center_inside", [True, False])
def test_l1_box_concretization_matches_linprog(center_inside):
    rng = np.random.default_rng(7)
    n, m = 6, 5
    lo, hi = -rng.random(n), rng.random(n)
    c = rng.uniform(lo, hi) if center_inside else hi + 0.1
    r = 0.8 if center_inside else 0.1 * n + 0.5
    region = Region(lo, hi, c, r)
    Lam = rng.normal(size=(m, n))
    const = rng.normal(size=m)
    got = concretize_lower(Lam, const, region)
    pts = concretize_argmin(Lam, region)
    for k in range(m):
        # variables (x, t): min Λx  s.t.  x − t ≤ c, −x − t ≤ −c, Σt ≤ r
        A_ub = np.block([[np.eye(n), -np.eye(n)], [-np.eye(n), -np.eye(n)], [np.zeros((1, n)), np.ones((1, n))]])
        b_ub = np.concatenate([c, -c, [r]])
        res = linprog(np.concatenate([Lam[k], np.zeros(n)]), A_ub=A_ub, b_ub=b_ub,
                      bounds=list(zip(lo, hi)) + [(0, None)] * n)
        assert res.status == 0
        assert got[k] == pytest.approx(res.fun + const[k], abs=1e-7)
        assert Lam[k] @ pts[k] + const[k] == pytest.approx(got[k], abs=1e-9)
        assert np.abs(pts[k] - c).sum() <= r + 1e-9


def test_lp_time_limit_stops_early_but_stays_sound():
    rng = np.random.default_rng(5)
    net = random_net(rng, [5, 30, 30, 30, 2])
    lo, hi = -np.ones(5), np.ones(5)
    crown = compute_bounds(net, lo, hi, "crown")
    b = compute_bounds(net, lo, hi, "lp", time_limit=1e-4)
    assert not b.complete
    for i in range(4):
        assert np.all(b.lower[i] >= crown.lower[i] - 1e-12) and np.all(b.upper[i] <= crown.upper[i] + 1e-12)
    pre = preactivations(net, sample_region(rng, lo, hi, 500))
    for i, z in enumerate(pre):
        assert np.all(z >= b.lower[i] - 1e-9) and np.all(z <= b.upper[i] + 1e-9)


def test_zero_weight_neurons_are_stably_inactive():
    W = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    net = Network([Dense(W, np.zeros(3)), ReLU(), Dense(np.ones((1, 3)))], (2,))
    b = compute_bounds(net, -np.ones(2), np.ones(2), "crown")
    assert b.lower[0][1] == 0.0 and b.upper[0][1] == 0.0
    assert not b.unstable(0)[1] and b.n_unstable() == [2]


def test_invalid_arguments_raise_clear_errors():
    net = Network([Dense(np.eye(2)), ReLU(), Dense(np.ones((1, 2)))], (2,))
    lo, hi = np.zeros(2), np.ones(2)
    with pytest.raises(InvalidInputError, match="method must be one of"):
        compute_bounds(net, lo, hi, "alpha")
    with pytest.raises(InvalidInputError, match=r"lower and upper must have shape \(2,\)"):
        compute_bounds(net, np.zeros(3), np.ones(3))
    with pytest.raises(InvalidInputError, match="non-empty"):
        compute_bounds(net, hi, lo)
    with pytest.raises(InvalidInputError, match="time_limit must be > 0"):
        compute_bounds(net, lo, hi, "lp", time_limit=0)
    with pytest.raises(InvalidInputError, match="given together"):
        compute_bounds(net, lo, hi, l1_center=lo)
    with pytest.raises(InvalidInputError, match="misses the box"):
        compute_bounds(net, lo, hi, l1_center=np.full(2, 3.0), l1_radius=1.0)
    with pytest.raises(InvalidInputError, match="network must be"):
        compute_bounds("net", lo, hi)
    b = compute_bounds(net, lo, hi)
    with pytest.raises(InvalidInputError, match="C must have 1 columns"):
        linear_lower_bound(net, b, np.ones((1, 2)), lower=lo, upper=hi)


def test_lp_time_limit_is_per_solve_not_cumulative():
    # HiGHS compares time_limit with its run time summed over all solves of one model: a naive
    # per-solve limit makes every later LP of a layer stop at once (bounds silently left loose)
    from mipprune.verification.bounds import _TriangleLP

    rng = np.random.default_rng(0)
    net = random_net(rng, [20, 40, 40, 2])
    region = make_region(20, -np.ones(20), np.ones(20))
    b = compute_bounds(net, region.lower, region.upper, "crown")
    lp = _TriangleLP(region)
    lp.add_layer(0, net.to_affine_relu()[0], b.lower[0], b.upper[0])
    W = net.to_affine_relu()[1].weight
    per_solve = 0.2
    results = []
    while lp.h.getRunTime() < 2 * per_solve:   # run well past a cumulative limit of per_solve
        for k in range(W.shape[0]):
            lp.set_objective(W[k])
            results.append(lp.minimize(per_solve))
    assert len(results) > W.shape[0] and all(v is not None for v in results)
