"""SCIP's root cuts of a verification MILP (solvers/milp_cuts.py): every cut holds at the network's own points
and at the MILP's exact maximum of its left-hand side; the root bound is a valid lower bound."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from solvers.milp import build_milp, solution_from_input, solve_highs
from solvers.network.ir import Network
from solvers.network.layers import Dense, ReLU
from solvers.result import Status

pytest.importorskip("pyscipopt")
from solvers.milp_cuts import available, root_cuts  # noqa: E402


def _net_and_model(seed):
    rng = np.random.default_rng(seed)
    sizes = [4, 14, 14, 3]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(Dense(rng.normal(size=(sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]), 0.3 * rng.normal(size=sizes[i + 1])))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    net = Network(layers, (sizes[0],))
    lo, hi = -np.ones(4), np.ones(4)
    lower, upper = [], []
    hl, hu = lo, hi
    for layer in layers:   # interval bounds of every affine block
        if isinstance(layer, Dense):
            W, b = layer.weight, layer.bias
            mid, rad = (hl + hu) / 2, (hu - hl) / 2
            l, u = W @ mid + b - np.abs(W) @ rad, W @ mid + b + np.abs(W) @ rad
            lower.append(l)
            upper.append(u)
            hl, hu = np.maximum(l, 0), np.maximum(u, 0)
    c = np.array([1.0, -1.0, 0.0])
    return rng, net, lo, hi, build_milp(net, lower, upper, lower=lo, upper=hi).with_objective(c)


@pytest.mark.parametrize("seed", range(3))
def test_root_cuts_hold_at_network_points_and_at_the_milps_maximum(seed):
    rng, net, lo, hi, model = _net_and_model(seed)
    assert available()
    rc = root_cuts(model, rounds=3, time_limit=30)
    assert rc.K > 0 and rc.coef.shape == (rc.K, model.n_vars) and rc.model is model
    X = rng.uniform(lo, hi, size=(2000, 4))
    X[:500] = np.where(rng.random((500, 4)) < 0.5, lo, hi)
    V = np.stack([solution_from_input(model, net, x) for x in X])
    assert np.all(rc.coef @ V.T <= rc.rhs[:, None] + 1e-9)
    for k in range(min(rc.K, 6)):
        a = rc.coef[k].toarray().ravel()
        sol = solve_highs(replace(model, cost=-a, offset=0.0), time_limit=30)
        assert sol.status == Status.OPTIMAL and -sol.objective <= rc.rhs[k] + 1e-7
    opt = solve_highs(model, time_limit=30)
    assert opt.status == Status.OPTIMAL and rc.bound <= opt.objective + 1e-6


def test_more_rounds_never_weaken_the_root_bound():
    _, _, _, _, model = _net_and_model(1)
    one, three = (root_cuts(model, rounds=r, time_limit=30) for r in (1, 3))
    assert three.bound >= one.bound - 1e-7


@pytest.mark.parametrize("seed", range(2))
def test_the_root_starts_from_the_lp_relaxation_and_spends_no_lp_on_strong_branching(seed):
    # the root LP is solved by primal simplex and the root does not branch by LP (``ROOT_LP_PARAMS``): its bound is
    # still at least the LP relaxation's optimum (HiGHS, integrality dropped), and no simplex iteration is spent on
    # strong branching (SCIP's default spent 10 of 98 s there on OVAL21 deep img4405)
    _, _, _, _, model = _net_and_model(seed)
    rc = root_cuts(model, rounds=3, time_limit=30)
    lp = solve_highs(replace(model, integrality=np.zeros_like(model.integrality)), time_limit=30)
    assert lp.status == Status.OPTIMAL and rc.bound >= lp.objective - 1e-7
    assert rc.info["lp_iterations"] > 0 and rc.info["strong_branching_iterations"] == 0
