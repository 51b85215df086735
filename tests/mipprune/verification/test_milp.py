"""MILP encoding: counts, exploitation of zeros, exact optima (brute force over activation patterns)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from solvers.backends import available_backends, require_backend
from mipprune.verification.bounds import compute_bounds
from solvers.network.spec import make_region
from solvers.errors import InvalidInputError, SolverNotAvailableError
from solvers.milp import build_milp, build_pyomo, solution_from_input, solve_highs, solve_pyomo
from solvers.network.layers import Dense, ReLU
from solvers.network.ir import Network
from solvers.result import Status
from tests.mipprune.verification.test_bounds import random_net


def preact(bounds):
    """Pre-activation bounds as the plain arrays :func:`build_milp` takes."""
    return bounds.lower, bounds.upper


def exact_min(net: Network, lo, hi, c, d=0.0, *, l1=None, rows=None):
    """``min c·y + d`` over the region (``rows=(A, b)``: also ``A y <= b``) by enumerating every
    activation pattern of the hidden neurons and solving one LP in ``x`` per pattern.

    Returns the minimum (``inf`` if the region ∩ rows is empty) and a minimizer.
    """
    blocks = net.to_affine_relu()
    n = lo.size
    hidden = [b.shape[0] for b in blocks[:-1]]
    # interval bounds (simple, tested on their own) fix the stable neurons; enumerate the others
    ibp = compute_bounds(net, lo, hi, "interval")
    fixed = np.concatenate([np.where(ibp.lower[i] >= 0, 1, np.where(ibp.upper[i] <= 0, 0, -1))
                            for i in range(len(hidden))])
    free = np.flatnonzero(fixed < 0)
    best, arg = np.inf, None
    for bits in itertools.product([0, 1], repeat=free.size):
        pattern = fixed.copy()
        pattern[free] = bits
        # propagate the affine map x -> z for this pattern, collecting sign constraints
        M, v = np.eye(n), np.zeros(n)
        A_ub, b_ub, k = [], [], 0
        for blk, h in zip(blocks[:-1], hidden):
            W = blk.dense()
            Mz, vz = W @ M, W @ v + blk.bias
            p = np.array(pattern[k:k + h], dtype=float)
            k += h
            sign = np.where(p > 0, -1.0, 1.0)   # active: z >= 0 ⇔ −z <= 0; inactive: z <= 0
            A_ub.append(sign[:, None] * Mz)
            b_ub.append(-sign * vz)
            M, v = p[:, None] * Mz, p * vz
        W = blocks[-1].dense()
        My, vy = W @ M, W @ v + blocks[-1].bias
        if rows is not None:
            A_ub.append(rows[0] @ My)
            b_ub.append(rows[1] - rows[0] @ vy)
        A, b = np.vstack(A_ub), np.concatenate(b_ub)
        cost = c @ My
        bounds = list(zip(lo, hi))
        if l1 is not None:   # (x, t) with t >= |x − center|, Σ t <= r
            center, r = l1
            A = np.hstack([A, np.zeros((A.shape[0], n))])
            A = np.vstack([A, np.hstack([np.eye(n), -np.eye(n)]), np.hstack([-np.eye(n), -np.eye(n)]),
                           np.concatenate([np.zeros(n), np.ones(n)])[None, :]])
            b = np.concatenate([b, center, -center, [r]])
            cost = np.concatenate([cost, np.zeros(n)])
            bounds += [(0, None)] * n
        res = linprog(cost, A_ub=A, b_ub=b, bounds=bounds, method="highs")
        if res.status == 0 and res.fun + c @ vy + d < best:
            best, arg = res.fun + c @ vy + d, res.x[:n]
    return best, arg


def _net_with_zeros():
    rng = np.random.default_rng(11)
    W0 = rng.normal(size=(6, 3))
    W0[2] = 0.0                      # a pruned neuron: zero row and zero bias
    W1 = rng.normal(size=(4, 6))
    W1[:, 4] = 0.0                   # a neuron nobody reads
    b0 = rng.normal(size=6) * 0.3
    b0[2] = 0.0
    return Network([Dense(W0, b0), ReLU(), Dense(W1, rng.normal(size=4) * 0.3), ReLU(),
                    Dense(rng.normal(size=(2, 4)))], (3,))


@pytest.mark.parametrize("preact_vars", [True, False])
def test_binaries_equal_unstable_neurons_and_counts_add_up(preact_vars):
    rng = np.random.default_rng(2)
    net = random_net(rng, [4, 7, 6, 3])
    lo, hi = -np.ones(4), np.ones(4)
    b = compute_bounds(net, lo, hi, "crown")
    m = build_milp(net, b.lower, b.upper, lower=lo, upper=hi, preact_vars=preact_vars)
    n_unstable = sum(b.n_unstable())
    alive = sum(int(np.count_nonzero(b.upper[i] > 0)) for i in range(2))
    n_active = sum(int(np.count_nonzero((b.lower[i] >= 0) & (b.upper[i] > 0))) for i in range(2))
    assert n_unstable > 0
    assert m.n_binaries == n_unstable
    z = n_unstable if preact_vars else 0   # one pre-activation column (and its defining row) per unstable
    assert m.n_vars == 4 + alive + n_unstable + z
    assert m.n_constraints == n_active + 3 * n_unstable + z
    assert m.build_time >= 0


def test_both_encodings_have_the_same_optimum():
    rng = np.random.default_rng(3)
    net = random_net(rng, [3, 6, 5, 2])
    lo, hi = -np.ones(3), np.ones(3)
    b = compute_bounds(net, lo, hi, "crown")
    c = np.array([1.0, -1.0])
    with_z = solve_highs(build_milp(net, b.lower, b.upper, lower=lo, upper=hi, preact_vars=True).with_objective(c))
    without = solve_highs(build_milp(net, b.lower, b.upper, lower=lo, upper=hi, preact_vars=False).with_objective(c))
    assert with_z.status == without.status == Status.OPTIMAL
    assert with_z.objective == pytest.approx(without.objective, abs=1e-7)


def test_pruned_neurons_add_no_variables_or_binaries():
    net = _net_with_zeros()
    lo, hi = -np.ones(3), np.ones(3)
    b = compute_bounds(net, lo, hi, "crown")
    m = build_milp(net, b.lower, b.upper, lower=lo, upper=hi)
    assert b.lower[0][2] == b.upper[0][2] == 0.0
    assert m.unit_cols[0][2] == -1 and m.binary_cols[0][2] == -1
    # the same network with the zero neuron physically removed gives the same model size
    blocks = net.to_affine_relu()
    keep = np.array([0, 1, 3, 4, 5])
    W0, b0 = blocks[0].dense()[keep], blocks[0].bias[keep]
    W1 = blocks[1].dense()[:, keep]
    small = Network([Dense(W0, b0), ReLU(), Dense(W1, blocks[1].bias), ReLU(), Dense(blocks[2].dense())], (3,))
    ms = build_milp(small, *preact(compute_bounds(small, lo, hi, "crown")), lower=lo, upper=hi)
    assert (m.n_vars, m.n_binaries, m.n_constraints) == (ms.n_vars, ms.n_binaries, ms.n_constraints)
    # the unread neuron's column carries no coefficient in the next block's rows
    col = m.unit_cols[0][4]
    assert col >= 0, "the test needs neuron 4 alive"
    assert m.A.tocsc()[:, col].nnz <= 3   # only its own ReLU rows, nothing from the next block
    # and zero weights are not stored: nonzeros equal those of the smaller network's model
    assert m.n_nonzeros == ms.n_nonzeros


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_optimum_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [2, 4, 4, 2])
    lo, hi = -np.ones(2), np.ones(2)
    b = compute_bounds(net, lo, hi, "crown")
    c = np.array([1.0, -1.0])
    m = build_milp(net, b.lower, b.upper, lower=lo, upper=hi).with_objective(c, 0.25)
    sol = solve_highs(m)
    ref, _ = exact_min(net, lo, hi, c, 0.25)
    assert sol.status == Status.OPTIMAL
    assert sol.objective == pytest.approx(ref, abs=1e-6)
    assert sol.bound <= sol.objective + 1e-9
    x = m.input_of(sol.values)
    assert c @ net.forward(x) + 0.25 == pytest.approx(sol.objective, abs=1e-5)


@pytest.mark.parametrize("preact_vars", [True, False])
def test_forward_pass_is_a_feasible_milp_point(preact_vars):
    rng = np.random.default_rng(4)
    net = random_net(rng, [3, 6, 6, 2])
    lo, hi = -np.ones(3), np.ones(3)
    b = compute_bounds(net, lo, hi, "lp")
    m = build_milp(net, b.lower, b.upper, lower=lo, upper=hi, preact_vars=preact_vars)
    for x in rng.uniform(lo, hi, size=(20, 3)):
        v = solution_from_input(m, net, x)
        Av = m.A @ v
        assert np.all(Av >= m.row_lower - 1e-9) and np.all(Av <= m.row_upper + 1e-9)
        assert np.all(v >= m.col_lower - 1e-9) and np.all(v <= m.col_upper + 1e-9)
        M, bias = m.out_map
        np.testing.assert_allclose(M @ v + bias, net.forward(x), atol=1e-9)


def test_l1_ball_milp_matches_brute_force():
    rng = np.random.default_rng(6)
    net = random_net(rng, [3, 4, 3, 2])
    center = np.array([0.2, -0.1, 0.3])
    lo, hi = center - 1.0, center + 1.0
    b = compute_bounds(net, lo, hi, "crown", l1_center=center, l1_radius=0.6)
    c = np.array([-1.0, 1.0])
    m = build_milp(net, b.lower, b.upper, lower=lo, upper=hi, l1_center=center, l1_radius=0.6).with_objective(c)
    sol = solve_highs(m)
    ref, _ = exact_min(net, lo, hi, c, l1=(center, 0.6))
    assert sol.status == Status.OPTIMAL and sol.objective == pytest.approx(ref, abs=1e-6)
    assert np.abs(m.input_of(sol.values) - center).sum() <= 0.6 + 1e-6
    box_only = solve_highs(build_milp(net, *preact(compute_bounds(net, lo, hi)), lower=lo, upper=hi).with_objective(c))
    assert box_only.objective <= sol.objective + 1e-9


def test_cutoff_proves_min_above_zero_or_stops_below_it():
    rng = np.random.default_rng(8)
    net = random_net(rng, [2, 5, 5, 2])
    lo, hi = -np.ones(2), np.ones(2)
    base = build_milp(net, *preact(compute_bounds(net, lo, hi, "crown")), lower=lo, upper=hi)
    c = np.array([1.0, -1.0])
    ref, _ = exact_min(net, lo, hi, c)
    above = solve_highs(base.with_objective(c, -ref + 0.5), cutoff=0.0, target=0.0)   # min = 0.5 > 0
    assert above.status == Status.INFEASIBLE or (above.bound is not None and above.bound > 0)
    below = solve_highs(base.with_objective(c, -ref - 0.5), cutoff=0.0, target=0.0)   # min = −0.5
    assert below.status in (Status.FEASIBLE, Status.OPTIMAL) and below.objective <= 0


def test_output_constraints_restrict_the_feasible_set():
    rng = np.random.default_rng(9)
    net = random_net(rng, [2, 4, 3, 2])
    lo, hi = -np.ones(2), np.ones(2)
    base = build_milp(net, *preact(compute_bounds(net, lo, hi, "crown")), lower=lo, upper=hi)
    A, bb = np.array([[1.0, 0.0]]), np.array([0.0])
    c = np.array([0.0, 1.0])
    sol = solve_highs(base.with_objective(c).with_output_constraints(A, bb))
    ref, _ = exact_min(net, lo, hi, c, rows=(A, bb))
    if np.isfinite(ref):
        assert sol.status == Status.OPTIMAL and sol.objective == pytest.approx(ref, abs=1e-6)
        assert net.forward(base.input_of(sol.values))[0] <= 1e-6
    else:
        assert sol.status == Status.INFEASIBLE


@pytest.mark.skipif("pyomo-appsi_highs" not in available_backends(), reason="Pyomo appsi_highs not installed")
@pytest.mark.parametrize("seed", [0, 5])
def test_highspy_and_pyomo_agree_on_the_optimum(seed):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [3, 5, 4, 2])
    lo, hi = -np.ones(3), np.ones(3)
    m = build_milp(net, *preact(compute_bounds(net, lo, hi, "crown")), lower=lo, upper=hi).with_objective([1.0, -2.0])
    direct = solve_highs(m)
    via_pyomo = solve_pyomo(m, "appsi_highs", time_limit=30)
    assert direct.status == via_pyomo.status == Status.OPTIMAL
    assert via_pyomo.objective == pytest.approx(direct.objective, abs=1e-6)
    pm = build_pyomo(m)
    assert len(pm.v) == m.n_vars and len(pm.c) == m.n_constraints
    assert sum(1 for j in pm.v if pm.v[j].is_binary()) == m.n_binaries


def test_backend_discovery_and_errors():
    assert "highs" in available_backends()
    assert require_backend("highs") == "highs"
    with pytest.raises(SolverNotAvailableError, match=r"backend 'nosuchsolver' is not available; installed: highs"):
        require_backend("nosuchsolver")


def test_invalid_model_inputs_raise():
    net = Network([Dense(np.eye(2)), ReLU(), Dense(np.ones((1, 2)))], (2,))
    lo, hi = -np.ones(2), np.ones(2)
    b = compute_bounds(net, lo, hi)
    m = build_milp(net, b.lower, b.upper, region=make_region(2, lo, hi))
    with pytest.raises(InvalidInputError, match=r"c must have shape \(1,\)"):
        m.with_objective([1.0, 2.0])
    with pytest.raises(InvalidInputError, match="start must have shape"):
        solve_highs(m, start=np.zeros(1))
    b.lower[0] = np.full(2, -np.inf)
    with pytest.raises(InvalidInputError, match="must be finite"):
        build_milp(net, b.lower, b.upper, lower=lo, upper=hi)
