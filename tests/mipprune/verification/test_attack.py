"""PGD falsification: hits are real (float64 re-check, inside the region), misses on safe queries,
exact projection onto box ∩ L1 ball, and hand-written gradients agree with finite differences."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mipprune.verification.attack import _backward, _forward, _ops, pgd_attack, project_region
from solvers.errors import InvalidInputError
from solvers.network.layers import Add, Conv2d, Dense, Flatten, Normalize, ReLU
from solvers.network.ir import Network
from solvers.network.spec import Spec


def _mlp(seed=0, n_in=20, hidden=50, n_out=5):
    rng = np.random.default_rng(seed)
    return Network([Dense(rng.normal(size=(hidden, n_in)), rng.normal(size=hidden)), ReLU(),
                    Dense(rng.normal(size=(n_out, hidden)))], input_shape=(n_in,))


def test_attack_finds_a_known_counterexample_and_it_passes_the_float64_check():
    # y = (x0 + x1, 1): unsafe iff x0 + x1 >= 1.5, reachable only near the corner (1, 1)
    net = Network([Dense(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([0.0, 1.0]))], input_shape=(2,))
    spec = Spec(np.zeros(2), np.ones(2), ((np.array([[-1.0, 1.0]]), np.array([-0.5])),))
    x = pgd_attack(net, spec)
    assert x is not None and x.dtype == np.float64 and x.shape == (2,)
    assert spec.contains_input(x) and spec.is_counterexample(net, x)
    assert x.sum() >= 1.5


def test_attack_returns_none_when_the_unsafe_region_is_unreachable():
    # outputs are in [0, 2] on the box; unsafe needs y0 >= 3
    net = Network([Dense(np.array([[1.0, 1.0], [1.0, -1.0]])), ReLU(), Dense(np.eye(2))], input_shape=(2,))
    spec = Spec(np.zeros(2), np.ones(2), ((np.array([[-1.0, 0.0]]), np.array([-3.0])),))
    assert pgd_attack(net, spec, restarts=3, steps=20) is None


def test_attack_finds_whatever_dense_random_sampling_finds_on_random_queries():
    net = _mlp()
    rng = np.random.default_rng(1)
    sampled_sat = 0
    for _ in range(10):
        x0 = rng.uniform(size=20)
        label = int(np.argmax(net.forward(x0)))
        spec = Spec.robustness(x0, 0.05, label, 5)
        pts = spec.lower + rng.uniform(size=(3000, 20)) * (spec.upper - spec.lower)
        by_sampling = bool(np.any(np.argmax(net.forward(pts), axis=1) != label))
        x = pgd_attack(net, spec, restarts=4, steps=30, seed=3)
        if x is not None:
            assert spec.contains_input(x) and spec.is_counterexample(net, x)
            y = net.forward(x)
            assert np.delete(y, label).max() >= y[label]      # some other logit reaches the label's
        if by_sampling:
            sampled_sat += 1
            assert x is not None
    assert sampled_sat >= 1


def test_attack_with_an_l1_ball_stays_inside_it():
    net = _mlp(seed=2)
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(6):
        x0 = rng.uniform(size=20)
        spec = Spec.robustness(x0, 0.6, int(np.argmax(net.forward(x0))), 5, norm="l1")
        x = pgd_attack(net, spec, restarts=4, steps=40)
        if x is not None:
            hits += 1
            assert np.abs(x - x0).sum() <= 0.6 and spec.is_counterexample(net, x)
    assert hits >= 1


def test_explicit_start_that_is_a_counterexample_is_returned_without_steps():
    net = _mlp(seed=4)
    x0 = np.full(20, 0.5)
    label = int(np.argmax(net.forward(x0)))
    spec = Spec(np.zeros(20), np.ones(20), Spec.robustness(x0, 0.5, label, 5).disjuncts)
    # find some point of another class by sampling, then hand it over as a start
    rng = np.random.default_rng(0)
    pts = rng.uniform(size=(2000, 20))
    other = pts[np.argmax(net.forward(pts), axis=1) != label][0]
    x = pgd_attack(net, spec, steps=0, restarts=1, starts=other[None, :])
    assert x is not None and spec.is_counterexample(net, x)
    np.testing.assert_array_equal(x, other)


def test_projection_onto_box_and_l1_ball_is_the_euclidean_projection():
    # p is the projection of z onto the convex set C iff p ∈ C and (z − p)·(q − p) <= 0 for all q ∈ C
    rng = np.random.default_rng(0)
    n = 10
    c = rng.uniform(0.2, 0.8, n)
    spec = Spec.robustness(c, 0.5, 0, 3, norm="l1")
    Z = rng.uniform(-0.5, 1.5, size=(6, n))
    P = project_region(spec, Z)
    Q = project_region(spec, rng.uniform(-1, 2, size=(4000, n)))       # points of C, many on its faces
    Q = np.vstack([Q, c + 0.5 * np.vstack([np.eye(n), -np.eye(n)])])    # the ball's vertices
    Q = Q[[spec.contains_input(q) for q in Q]]
    assert len(Q) > 4000
    for z, p in zip(Z, P):
        assert spec.contains_input(p)
        assert np.abs(p - c).sum() == pytest.approx(0.5, abs=1e-9)     # these z lie outside the ball
        assert np.max((Q - p) @ (z - p)) <= 1e-9


def test_projection_with_centre_outside_the_box_uses_bisection_and_stays_feasible():
    c = np.array([1.2, 0.5, 0.5])            # centre outside [0, 1]^3, ball still meets the box
    spec = Spec(np.zeros(3), np.ones(3), ((np.eye(3)[:1], np.zeros(1)),), l1_center=c, l1_radius=0.5)
    P = project_region(spec, np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    for p in P:
        assert spec.contains_input(p)
    empty = Spec(np.zeros(3), np.ones(3), ((np.eye(3)[:1], np.zeros(1)),), l1_center=c + 1, l1_radius=0.5)
    with pytest.raises(InvalidInputError, match="input region is empty"):
        project_region(empty, np.zeros((1, 3)))


def test_backprop_matches_finite_differences_through_conv_normalize_and_residual_add():
    rng = np.random.default_rng(1)
    net = Network([Normalize(np.array(0.1), np.array(0.3)), Conv2d(rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2)),
                   ReLU(), Flatten(), Dense(rng.normal(size=(32, 32)), rng.normal(size=32)), ReLU(),
                   Add(source=4), Dense(rng.normal(size=(3, 32)))], input_shape=(1, 6, 6))
    ops = _ops(net, dtype=np.float64)
    X = rng.uniform(size=(4, 36))
    acts = _forward(ops, X)
    np.testing.assert_allclose(acts[-1], net.forward(X), atol=1e-10)
    w = rng.normal(size=(4, 3))
    g = _backward(ops, acts, w)
    eps = 1e-6
    for i in (0, 7, 20):
        Xp = X.copy()
        Xp[:, i] += eps
        fd = ((net.forward(Xp) - net.forward(X)) * w).sum(axis=1) / eps
        np.testing.assert_allclose(g[:, i], fd, rtol=1e-4, atol=1e-4)


def test_time_limit_stops_the_attack_early():
    net = _mlp(seed=6, n_in=200, hidden=200)
    spec = Spec(np.zeros(200), np.ones(200), ((np.array([[-1.0, 0, 0, 0, 0]]), np.array([-1e9])),))
    t = time.perf_counter()
    assert pgd_attack(net, spec, restarts=5, steps=100_000, time_limit=0.2) is None
    assert time.perf_counter() - t < 5.0


def test_attack_rejects_mismatched_specs_and_bad_options():
    net = _mlp()
    spec = Spec(np.zeros(3), np.ones(3), ((np.ones((1, 5)), np.zeros(1)),))
    with pytest.raises(InvalidInputError, match="spec must have 20 inputs"):
        pgd_attack(net, spec)
    good = Spec(np.zeros(20), np.ones(20), ((np.ones((1, 5)), np.zeros(1)),))
    with pytest.raises(InvalidInputError, match="restarts must be >= 1; got 0"):
        pgd_attack(net, good, restarts=0)
    with pytest.raises(InvalidInputError, match="starts must have 20 columns"):
        pgd_attack(net, good, starts=np.zeros((2, 3)))


def test_attack_falsifies_a_shared_mnist_instance(shared_bench):
    from solvers.network.vnnlib import load_vnnlib

    net = Network.from_onnx(shared_bench / "onnx" / "mnist-net_256x2.onnx")
    (spec,) = load_vnnlib(shared_bench / "vnnlib" / "prop_1_0.03.vnnlib", 784, 10)   # consensus: sat
    x = pgd_attack(net, spec)
    assert x is not None and spec.is_counterexample(net, x)
