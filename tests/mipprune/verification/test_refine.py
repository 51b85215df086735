"""MILP-refined intermediate bounds (:mod:`mipprune.verification.refine`): sound, at least as tight
as LP tightening, time-boxed, and the verifier's verdicts unchanged when branch and bound starts
from them."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mipprune.verification.bounds import compute_bounds
from mipprune.verification.refine import REFINE_SLACK, refine_bounds
from mipprune.verification.verify import verify
from solvers.errors import InvalidInputError
from solvers.network.spec import Spec, make_region
from solvers.result import Verdict
from tests.mipprune.verification.test_bounds import preactivations, random_net, sample_region


def _tol(b):
    return 2 * REFINE_SLACK * (1.0 + np.abs(b)) + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refined_bounds_are_sound_and_at_least_as_tight_as_lp(seed):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [4, 8, 8, 8, 3])
    lo, hi = rng.uniform(-1, 0, 4), rng.uniform(0, 1, 4)
    region = make_region(4, lo, hi)
    crown = compute_bounds(net, lo, hi, "crown")
    lp = compute_bounds(net, lo, hi, "lp")
    # from the CROWN bounds, solved to optimality (no time box): the exact range of every neuron,
    # so never looser than the LP relaxation's
    ref, info = refine_bounds(net, crown, region)
    assert info.complete and info.solves > 0 and info.timed_out == 0
    for i in range(1, len(ref.lower) - 1):
        # every ReLU relaxation at least as tight: stable wherever the LP's is, and where still
        # unstable, inside the LP's interval (a stable neuron's other side is not refined)
        ref_open, lp_open = ref.unstable(i), lp.unstable(i)
        assert not np.any(ref_open & ~lp_open), f"block {i}: refinement left open a neuron the LP closed"
        assert np.all(ref.lower[i][ref_open] >= lp.lower[i][ref_open] - _tol(lp.lower[i][ref_open]))
        assert np.all(ref.upper[i][ref_open] <= lp.upper[i][ref_open] + _tol(lp.upper[i][ref_open]))
        assert np.all(ref.lower[i] >= crown.lower[i]) and np.all(ref.upper[i] <= crown.upper[i])
    assert sum(info.unstable_after) <= sum(lp.n_unstable())
    # sound: no sampled input leaves the refined range of any pre-activation
    X = sample_region(rng, lo, hi, 4000)
    for i, Z in enumerate(preactivations(net, X)[:-1]):
        assert np.all(Z >= ref.lower[i] - 1e-9) and np.all(Z <= ref.upper[i] + 1e-9), f"block {i}"
    # and strictly tighter somewhere (the MILP sees through the triangle relaxation)
    def relaxation_area(bd, i):   # Σ −l·u/2 over unstable neurons: the triangles' size
        o = bd.unstable(i)
        return float(np.sum(-bd.lower[i][o] * bd.upper[i][o])) / 2

    gain = sum(relaxation_area(lp, i) - relaxation_area(ref, i) for i in range(1, len(ref.lower) - 1))
    assert gain > 0


def test_refinement_honours_its_time_box():
    rng = np.random.default_rng(3)
    net = random_net(rng, [60, 120, 120, 120, 5])
    lo, hi = -np.ones(60), np.ones(60)
    crown = compute_bounds(net, lo, hi, "crown")
    t = time.perf_counter()
    ref, info = refine_bounds(net, crown, make_region(60, lo, hi), time_limit=0.6, solve_cap=0.3)
    took = time.perf_counter() - t
    assert took < 0.6 + 1.0, f"refinement took {took:.2f} s for a 0.6 s time box ({info.summary()})"
    assert not info.complete and not ref.complete
    # cut short, still sound and never looser
    X = sample_region(rng, lo, hi, 500)
    for i, Z in enumerate(preactivations(net, X)[:-1]):
        assert np.all(Z >= ref.lower[i] - 1e-9) and np.all(Z <= ref.upper[i] + 1e-9)
        assert np.all(ref.lower[i] >= crown.lower[i]) and np.all(ref.upper[i] <= crown.upper[i])


def test_refine_rejects_bad_input():
    net = random_net(np.random.default_rng(0), [2, 3, 3, 2])
    b = compute_bounds(net, np.zeros(2), np.ones(2), "crown")
    with pytest.raises(InvalidInputError, match="time_limit"):
        refine_bounds(net, b, make_region(2, np.zeros(2), np.ones(2)), time_limit=0)
    with pytest.raises(InvalidInputError, match="refine must be one of"):
        verify(net, Spec.robustness(np.full(2, 0.5), 0.1, 0, 2), refine="yes")


def _deep_case(seed: int):
    """Tiny 4-hidden-layer robustness queries that reach ReLU branch and bound (found by a search
    over seeds: 107 is robust, 108 is not, neither decided by the bounds, attack or LP stage)."""
    rng = np.random.default_rng(seed)
    net = random_net(rng, [3, 10, 10, 10, 10, 3])
    x0 = rng.uniform(0.3, 0.7, 3)
    return net, Spec.robustness(x0, 0.6, int(np.argmax(net.forward(x0))), 3)


@pytest.mark.parametrize("seed, modes", [(107, ("after-lp", "instead-of-lp")), (108, ("after-lp",))])
def test_branch_and_bound_on_refined_bounds_agrees_with_the_milp(seed, modes):
    net, spec = _deep_case(seed)
    ref = verify(net, spec, time_limit=30, complete="milp", attack=False)
    assert ref.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED)
    for mode in modes:
        r = verify(net, spec, time_limit=10, complete="bab", refine=mode, attack=False)
        assert r.verdict is ref.verdict, (mode, r.message)
        assert r.stage in ("bab", "refine"), (mode, r.stage, r.message)
        assert "MILP refinement" in r.message and "refine" in r.stage_times   # the path is recorded
    off = verify(net, spec, time_limit=30, complete="bab", refine="off", attack=False)
    assert off.verdict is ref.verdict and "MILP refinement" not in off.message


def test_auto_refines_only_deep_networks_with_many_unstable_relus(monkeypatch):
    import mipprune.verification.verify as V

    deep, shallow = _deep_case(107)[0], random_net(np.random.default_rng(0), [3, 10, 10, 3])
    lo, hi = np.zeros(3), np.ones(3)
    bd, bs = compute_bounds(deep, lo, hi, "crown"), compute_bounds(shallow, lo, hi, "crown")
    blocks_d, blocks_s = deep.to_affine_relu(), shallow.to_affine_relu()
    monkeypatch.setattr(V, "REFINE_AUTO", True)
    monkeypatch.setattr(V, "REFINE_MIN_UNSTABLE", 1)
    assert sum(bd.n_unstable()) >= 1
    assert V._wants_refine("auto", blocks_d, bd) and not V._wants_refine("auto", blocks_s, bs)
    assert not V._wants_refine("off", blocks_d, bd) and V._wants_refine("after-lp", blocks_s, bs)
    monkeypatch.setattr(V, "REFINE_MIN_UNSTABLE", sum(bd.n_unstable()) + 1)
    assert not V._wants_refine("auto", blocks_d, bd)
    monkeypatch.setattr(V, "REFINE_AUTO", False)
    monkeypatch.setattr(V, "REFINE_MIN_UNSTABLE", 1)
    assert not V._wants_refine("auto", blocks_d, bd)


def test_a_cut_short_solve_does_not_cut_short_the_next(monkeypatch):
    """HiGHS keeps the interrupt flag across runs: after one solve stopped at its cap, the next
    ones must still run (and prove something), not stop at once."""
    import mipprune.verification.refine as R

    rng = np.random.default_rng(3)
    net = random_net(rng, [60, 120, 120, 5])
    lo, hi = -np.ones(60), np.ones(60)
    crown = compute_bounds(net, lo, hi, "crown")
    monkeypatch.setattr(R, "MIN_SOLVE", 0.05)
    walls = []
    orig = R.to_highs

    def timed_highs(*a, **kw):
        h = orig(*a, **kw)
        run = h.run

        def timed_run():
            t = time.perf_counter()
            out = run()
            walls.append(time.perf_counter() - t)
            return out
        h.run = timed_run
        set_option = h.setOptionValue
        # only the interrupt callback stops a solve
        h.setOptionValue = lambda k, v: set_option(k, v) if k != "time_limit" else None
        return h

    monkeypatch.setattr(R, "to_highs", timed_highs)
    _, info = refine_bounds(net, crown, make_region(60, lo, hi), time_limit=1.5, solve_cap=0.25)
    assert info.timed_out >= 2
    assert sum(w > 0.15 for w in walls) >= 2, walls   # not one real solve and then instant stops
