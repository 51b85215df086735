"""Cutting planes in bound propagation (cuts.py): without cuts the indicator relaxation is CROWN's
triangle; with valid cuts (each a MILP maximum) and any multipliers the bound stays below every
sampled margin; a cut that states the optimum lets the bound reach it; cuts map from MILP columns."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from mipprune.verification import crown
from mipprune.verification.bounds import compute_bounds
from mipprune.verification.cuts import Cuts, cut_bound, cuts_from_columns, optimize_cut_bound
from solvers.errors import InvalidInputError
from solvers.milp import build_milp, solve_highs
from solvers.result import Status
from tests.mipprune.verification.test_bounds import preactivations, random_net, sample_region


def _setup(seed, sizes=(4, 8, 8, 8, 3), width=0.6):
    rng = np.random.default_rng(seed)
    net = random_net(rng, list(sizes))
    c = rng.uniform(-0.5, 0.5, size=sizes[0])
    lo, hi = c - width, c + width
    b = compute_bounds(net, lo, hi, "crown")
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    lower = [tn.tensor(a)[None] for a in b.lower[:-1]]
    upper = [tn.tensor(a)[None] for a in b.upper[:-1]]
    L, U = tn.box(lo, hi)
    return rng, net, tn, b, lo, hi, lower, upper, L, U


def _params(tn, lower, upper, m, rng=None, cuts=None):
    """α (all neurons) and τ, σ (the neurons whose indicator a cut uses): CROWN's, or random with ``rng``."""
    al, ta, si = {}, {}, {}
    for j in range(tn.n_layers - 1):
        a, s, _, _ = crown.relaxation(lower[j], upper[j])
        n = a.shape[1]
        idx = cuts.q_idx.get(j, torch.zeros(0, dtype=torch.long)) if cuts is not None else torch.zeros(0, dtype=torch.long)
        if rng is None:
            al[j], ta[j] = a[:, None].expand(1, m, n).clone(), s[:, None, idx].expand(1, m, -1).clone()
            si[j] = torch.zeros(1, m, idx.numel(), dtype=tn.dtype)
        else:
            al[j] = tn.tensor(rng.uniform(0, 1, (1, m, n)))
            ta[j] = tn.tensor(rng.uniform(0, 1, (1, m, idx.numel())))
            si[j] = tn.tensor(rng.exponential(0.5, (1, m, idx.numel())))
    return al, ta, si


def _valid_cuts(rng, net, b, lo, hi, tn, K=6):
    """K random cuts over the MILP's columns, each with ``d`` = its exact maximum (so valid and tight)."""
    model = build_milp(net, b.lower, b.upper, lower=lo, upper=hi)
    coef = np.zeros((K, model.n_vars))
    d = np.zeros(K)
    for k in range(K):
        binaries = np.flatnonzero(model.integrality)      # every cut uses indicators: the δ-aware relaxation is tested
        cols = np.union1d(rng.choice(binaries, size=min(binaries.size, 2), replace=False),
                          rng.choice(model.n_vars, size=min(model.n_vars, 4), replace=False))
        coef[k, cols] = rng.normal(size=cols.size)
        sol = solve_highs(replace(model, cost=-coef[k]), time_limit=30)
        assert sol.status == Status.OPTIMAL
        d[k] = -sol.objective + 1e-9
    return model, cuts_from_columns(model, coef, d, tn)


@pytest.mark.parametrize("seed", range(3))
def test_without_cuts_the_indicator_relaxation_is_crowns_triangle(seed):
    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(seed)
    C = tn.tensor(rng.normal(size=(1, 4, 3)))
    c0 = tn.tensor(rng.normal(size=(1, 4)))
    empty = Cuts(torch.zeros(0, 4, dtype=tn.dtype), {}, {}, {}, torch.zeros(0, dtype=tn.dtype))
    al, ta, si = _params(tn, lower, upper, 4)
    lb, _ = cut_bound(tn, lower, upper, C, c0, L, U, empty, torch.zeros(1, 4, 0, dtype=tn.dtype), al, ta, si)
    ref = crown.backward_bound(tn, lower, upper, C, c0, L, U)[0]
    assert torch.allclose(lb, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_valid_cuts_with_any_multipliers_keep_the_bound_below_every_sample(seed):
    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(seed)
    _, cuts = _valid_cuts(rng, net, b, lo, hi, tn)
    X = sample_region(rng, lo, hi, 4000)
    zs = [torch.as_tensor(z) for z in preactivations(net, X)[:-1]]
    assert bool((cuts.violation(torch.as_tensor(X), zs) <= 1e-7).all()), "a valid cut is never violated"
    C = tn.tensor(rng.normal(size=(1, 3, 3)))
    c0 = torch.zeros(1, 3, dtype=tn.dtype)
    margins = (net.forward(X) @ C[0].numpy().T).min(axis=0)
    for trial in range(5):
        al, ta, si = _params(tn, lower, upper, 3, rng, cuts)
        mu = tn.tensor(rng.exponential(1.0, (1, 3, cuts.K)))
        lb, _ = cut_bound(tn, lower, upper, C, c0, L, U, cuts, mu, al, ta, si)
        assert np.all(lb[0].numpy() <= margins + 1e-9), trial
    best = optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=40)
    assert np.all(best[0].numpy() <= margins + 1e-9)
    plain = crown.backward_bound(tn, lower, upper, C, c0, L, U)[0]
    assert bool((best >= plain - 1e-12).all())     # the first iterate is CROWN's bound


def test_a_cut_that_states_the_optimum_lets_the_bound_reach_it():
    """Cut ``−c·(W_L h_L) <= −(opt − c·b_L)`` (the objective's last layer, valid by the exact minimum):
    the optimized bound reaches ``opt`` where CROWN and the cut-free optimization stay below it."""
    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(1, width=1.0)
    c = np.array([1.0, -1.0, 0.0])
    model = build_milp(net, b.lower, b.upper, lower=lo, upper=hi)
    opt = solve_highs(model.with_objective(c), time_limit=30).objective
    M, bias = model.out_map
    coef = -(M.T @ c)[None, :]
    cuts = cuts_from_columns(model, coef, [-(opt - c @ bias)], tn)
    C, c0 = tn.tensor(c)[None, None], torch.zeros(1, 1, dtype=tn.dtype)
    plain = float(crown.backward_bound(tn, lower, upper, C, c0, L, U)[0])
    free = float(optimize_cut_bound(tn, lower, upper, C, c0, L, U,
                                    Cuts(cuts.X[:0], {}, {}, {}, cuts.d[:0]), iters=60))
    with_cut = float(optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=150, lr_mu=0.05))
    assert plain < opt - 0.05 and free < opt - 0.05
    assert opt - 1e-3 * (1 + abs(opt)) <= with_cut <= opt + 1e-7
    # μ = 1 cancels the objective's last layer exactly: the bound is the optimum itself
    al, ta, si = _params(tn, lower, upper, 1, cuts=cuts)
    exact, _ = cut_bound(tn, lower, upper, C, c0, L, U, cuts, torch.ones(1, 1, 1, dtype=tn.dtype), al, ta, si)
    assert abs(float(exact) - opt) <= 1e-9 * (1 + abs(opt))


def test_cuts_on_other_columns_and_max_pool_nets_are_refused():
    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(0)
    model = build_milp(net, b.lower, b.upper, lower=lo, upper=hi)
    coef = np.zeros((1, model.n_vars + 1))
    coef[0, -1] = 1.0
    with pytest.raises(InvalidInputError, match="columns outside"):
        cuts_from_columns(replace(model, col_lower=np.zeros(model.n_vars + 1)), coef, [0.0], tn)
    pooled = crown.TorchNet(tn.W, tn.b, tn.device, tn.dtype, pool=[torch.zeros(8, 1, dtype=torch.long)] + [None] * 3)
    empty = Cuts(torch.zeros(0, 4, dtype=tn.dtype), {}, {}, {}, torch.zeros(0, dtype=tn.dtype))
    with pytest.raises(InvalidInputError, match="max pool"):
        cut_bound(pooled, lower, upper, tn.tensor(np.ones((1, 1, 3))), torch.zeros(1, 1, dtype=tn.dtype), L, U,
                  empty, torch.zeros(1, 1, 0, dtype=tn.dtype), {}, {}, {})


def _root_cuts_of(net, spec, b):
    from solvers.milp_cuts import root_cuts

    A, bb = spec.disjuncts[0]
    return root_cuts(build_milp(net, b.lower, b.upper, lower=spec.lower, upper=spec.upper).with_objective(A[0], -bb[0]),
                     rounds=3, time_limit=30)


def _cut_search_case(seed, eps):
    """A small net's robustness query with SCIP's root cuts of its first disjunct: ``(net, spec, blocks, b, rc,
    disjuncts)``, ``b`` the CROWN bounds the search starts from."""
    from tests.mipprune.verification.test_bab import _case

    net, spec = _case(seed, eps, (8, 24, 24, 24, 3))
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    return net, spec, net.to_affine_relu(), b, _root_cuts_of(net, spec, b), list(range(len(spec.disjuncts)))


@pytest.mark.parametrize("seed,eps", [(0, 0.25), (2, 0.25), (3, 0.25), (5, 0.4)])
def test_branch_and_bound_with_scip_root_cuts_decides_like_without(seed, eps):
    pytest.importorskip("pyscipopt")
    import time

    from mipprune.verification.bab import relu_bab

    net, spec, blocks, b, rc, disj = _cut_search_case(seed, eps)
    runs = [relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60, cuts=c)
            for c in (None, rc)]
    assert runs[0].status == runs[1].status and runs[0].status in ("verified", "falsified")
    if runs[1].status == "falsified":
        assert spec.is_counterexample(net, runs[1].counterexample)
    elif runs[0].domains > 1:   # the cuts entered the root bound
        assert rc.K > 0 and runs[1].info["root_lb"] >= runs[1].info["root_lb_without_cuts"]


def test_verify_takes_cuts_and_says_what_they_did():
    pytest.importorskip("pyscipopt")
    from mipprune.verification.verify import verify
    from tests.mipprune.verification.test_bab import _case

    net, spec = _case(2, 0.25, (8, 24, 24, 24, 3))
    r = verify(net, spec, time_limit=60, complete="bab", refine="off", cuts="scip")
    assert r.verdict.value == "verified" and "SCIP root cuts before branch and bound" in r.message
    assert re.search(r"\d+ cuts joined after 1 domains", r.message)   # cuts="scip": at the search's first step
    with pytest.raises(InvalidInputError, match="cuts must be one of"):
        verify(net, spec, time_limit=5, cuts="gomory")


def test_auto_cuts_stay_off_on_fully_connected_nets_and_without_pyscipopt(monkeypatch):
    from mipprune.verification import verify as V
    from solvers import milp_cuts

    rng = np.random.default_rng(0)
    blocks = random_net(rng, [4, 8, 8, 3]).to_affine_relu()
    notes: list = []
    monkeypatch.setattr(milp_cuts, "available", lambda: True)
    assert not V._wants_cuts("auto", blocks, notes)        # the split refinement's networks
    assert V._wants_cuts("scip", blocks, notes) and not V._wants_cuts("off", blocks, notes)
    monkeypatch.setattr(V, "_fully_connected", lambda blocks: False)
    assert V._wants_cuts("auto", blocks, notes) and not notes
    monkeypatch.setattr(milp_cuts, "available", lambda: False)
    assert not V._wants_cuts("auto", blocks, notes) and not notes   # silently: cuts are optional
    assert not V._wants_cuts("scip", blocks, notes) and "pyscipopt is not installed" in notes[0]


def _lp_with_cuts(model, coef, d) -> float:
    """The LP relaxation of ``model`` with the cuts ``coef @ v <= d`` added (HiGHS)."""
    import scipy.sparse as sp

    from solvers.milp import to_highs

    lp = replace(model, A=sp.vstack([model.A, sp.csr_matrix(coef)]).tocsr(),
                 row_lower=np.concatenate([model.row_lower, np.full(len(d), -np.inf)]),
                 row_upper=np.concatenate([model.row_upper, d]), integrality=np.zeros_like(model.integrality))
    h = to_highs(lp)
    h.run()
    return float(h.getInfo().objective_function_value)


@pytest.mark.parametrize("seed,eps", [(0, 0.25), (3, 0.25), (5, 0.4)])
def test_the_default_steps_bring_the_cut_bound_close_to_the_lp_with_the_same_cuts(seed, eps):
    """GCP-CROWN is the Lagrangian dual of the LP relaxation with the cuts (same intermediate bounds): the
    optimized bound never exceeds that LP, and 300 default steps (``cuts.LR_MU`` on μ) close most of the gap
    from α-CROWN to it (here 93-98 %; the step size matters on OVAL21, see ``LR_MU``)."""
    pytest.importorskip("pyscipopt")
    from solvers.milp_cuts import root_cuts
    from tests.mipprune.verification.test_bab import _case

    net, spec = _case(seed, eps, (8, 24, 24, 24, 3))
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    A, bb = spec.disjuncts[0]
    model = build_milp(net, b.lower, b.upper, lower=spec.lower, upper=spec.upper).with_objective(A[0], -bb[0])
    rc = root_cuts(model, rounds=3, time_limit=30)
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    cuts = cuts_from_columns(model, rc.coef, rc.rhs, tn)
    lower = [tn.tensor(a)[None] for a in b.lower[:-1]]
    upper = [tn.tensor(a)[None] for a in b.upper[:-1]]
    L, U = tn.box(spec.lower, spec.upper)
    C, c0 = tn.tensor(A[:1])[None], tn.tensor(-bb[:1])[None]
    out: dict = {}
    alpha = float(crown.optimize_bound(tn, lower, upper, C, c0, L, U, iters=300, out=out)[0])
    lp = _lp_with_cuts(model, rc.coef, rc.rhs)
    gcp = float(optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=300, alphas=out["alphas"]))
    assert gcp <= lp + 1e-6 * (1 + abs(lp))
    if lp - alpha > 1e-3:   # the cuts move the LP: most of that is reached
        assert gcp >= alpha + 0.8 * (lp - alpha), (alpha, gcp, lp)


def _two_open_disjuncts(seeds=range(12)):
    """A case whose CROWN bounds leave two disjuncts open, with its blocks, bounds and margins."""
    from mipprune.verification import verify as V
    from tests.mipprune.verification.test_bab import _case

    for seed in seeds:
        net, spec = _case(seed, 0.3, (8, 24, 24, 24, 3))
        blocks = net.to_affine_relu()
        b = compute_bounds(net, spec.lower, spec.upper, "crown")
        lb = V._row_margins(blocks, b, _region(spec), spec)[0]
        offs = np.concatenate([[0], np.cumsum([A.shape[0] for A, _ in spec.disjuncts])])
        open_ = V._open(lb, offs)
        if len(open_) >= 2:
            return net, spec, blocks, b, lb, offs, open_
    pytest.skip("no case with two open disjuncts")


class _Source:
    """A cut source for ``relu_bab``: due at its ``after``-th question, once; records the frontiers it was given."""

    def __init__(self, cuts, after=2):
        self.cuts, self.after, self.asked, self.frontiers = cuts, after, 0, []

    def due(self):
        self.asked += 1
        return self.asked == self.after

    def __call__(self, frontier):
        self.frontiers.append(dict(frontier))
        return self.cuts


def test_cuts_that_join_a_running_search_prove_their_disjuncts_at_the_root_and_end_it():
    """Cuts arriving mid-search (``cut_source``): the root's multipliers are optimized with them, and disjuncts
    they prove at the root leave the search. Here each open disjunct gets the cut 'its margin >= half its MILP
    minimum' (valid: the MILP is exact), so every disjunct is proven the moment the cuts join."""
    import time

    import scipy.sparse as sp

    from mipprune.verification.bab import relu_bab
    from solvers.milp_cuts import RootCuts

    net, spec, blocks, b, lb, offs, open_ = _two_open_disjuncts([5])   # (safe: both MILP minima > 0.17)
    base = build_milp(net, b.lower, b.upper, lower=spec.lower, upper=spec.upper)
    M, bias = base.out_map
    rows, rhs = [], []
    for j in open_:
        A, bb = spec.disjuncts[j]
        k = int(np.argmin(lb[offs[j]:offs[j + 1]]))
        sol = solve_highs(base.with_objective(A[k], -bb[k]), time_limit=60)
        assert sol.status == Status.OPTIMAL
        if sol.objective <= 0:
            pytest.skip("a falsifiable case")
        scale = 100.0   # the same inequality, scaled: μ's small steps reach it in a few iterations
        rows.append(-scale * np.asarray(M.T @ A[k]).reshape(-1))
        rhs.append(scale * (A[k] @ bias - bb[k] - sol.objective / 2))
    cuts = RootCuts(sp.csr_matrix(np.array(rows)), np.array(rhs), None, 0.0, model=base)
    plain = relu_bab(net, spec, blocks, b.lower, b.upper, open_, deadline=time.perf_counter() + 60, root_iters=0)
    src = _Source(cuts)
    r = relu_bab(net, spec, blocks, b.lower, b.upper, open_, deadline=time.perf_counter() + 60, root_iters=0,
                 cut_source=src)
    assert plain.status == r.status == "verified"
    if plain.steps <= 1:
        pytest.skip("the plain search ended before the cuts were due")
    joined = r.info["cuts_joined"][0]
    assert set(src.frontiers[0]) <= set(open_) and src.frontiers[0]   # the disjuncts still open, with bounds
    assert joined["proven"] == len(src.frontiers[0]) and joined["root_lb"] > 0
    assert r.steps == 1 < plain.steps   # one step before the cuts, none after


def test_scip_cuts_join_in_two_stages_the_second_only_for_disjuncts_still_open(monkeypatch):
    """``verify._ScipCuts``: the first call asks SCIP for the worst open disjunct's MILP only; the second,
    ``CUT_STAGE_SECONDS`` later, for the disjuncts the search still has open that have no cuts of their own
    (none here when the frontier lists only the first); then it is never due again. The union holds at
    network points."""
    pytest.importorskip("pyscipopt")
    from mipprune.verification import verify as V
    from solvers.milp import solution_from_input

    net, spec, blocks, b, lb, offs, open_ = _two_open_disjuncts()
    region = _region(spec)
    monkeypatch.setattr(V, "CUT_STAGE_SECONDS", 0.0)
    frontier = {j: float(np.min(lb[offs[j]:offs[j + 1]])) for j in open_}
    worst = min(frontier, key=frontier.get)
    for still_open in ({worst}, set(open_)):
        notes: list = []
        src = V._ScipCuts(blocks, b, region, spec, lb, offs, V._Clock(120.0), notes, first_after=0.0)
        assert src.due()
        first = src({j: frontier[j] for j in open_})
        assert [j for j, _ in src.found] == [worst] and first is not None and "worst open disjunct" in notes[0]
        assert src.due()
        union = src({j: frontier[j] for j in still_open})
        assert not src.due()
        assert [j for j, _ in src.found] == [worst, *sorted(still_open - {worst}, key=frontier.get)]
        if still_open == {worst}:
            assert union is None and len(notes) == 1
            continue
        assert union is not None and union.K >= first.K and "more open disjunct(s)' MILPs" in notes[1]
        rng = np.random.default_rng(1)
        X = rng.uniform(spec.lower, spec.upper, size=(500, spec.lower.size))
        Vs = np.stack([solution_from_input(union.model, blocks, x) for x in X])
        assert np.all(union.coef @ Vs.T <= union.rhs[:, None] + 1e-9)
        assert src.seconds > 0 and "cuts" in src.clock.stages


def _region(spec):
    from solvers.network.spec import make_region

    return make_region(spec.lower.size, spec.lower, spec.upper, spec.l1_center, spec.l1_radius)


def _optimized_with_cuts(seed, iters):
    """A small net with valid cuts, one output row bounded by ``iters`` steps of the cut bound: ``(tn, cuts, lower,
    upper, L, U, C, c0, st, out)`` with ``st`` a search's :class:`bab._ReluState` and ``out`` the optimizer's."""
    from mipprune.verification.bab import _ReluState

    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(seed)
    _, cuts = _valid_cuts(rng, net, b, lo, hi, tn)
    C, c0 = tn.tensor(rng.normal(size=(1, 1, 3))), tn.tensor([[0.0]])
    st = _ReluState(tn, lower, upper, L, U, False, cuts=cuts)
    out: dict = {}
    optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=iters, out=out)
    return tn, cuts, lower, upper, L, U, C, c0, st, out


@pytest.mark.parametrize("seed", range(3))
def test_a_packed_cut_state_gives_back_the_bound_it_was_packed_at(seed):
    """A domain's cut state (μ, τ, σ) is stored packed in float16 for its children to start from: unpacked, it
    bounds the same domain as before to float16's precision, and the optimization started from it begins at
    that bound."""
    tn, cuts, lower, upper, L, U, C, c0, st, out = _optimized_with_cuts(seed, 40)
    al, ta, si, mu = out["alphas"], out["taus"], out["sigmas"], out["mu_last"].clamp(min=0)
    packed = st.pack_cut_state(mu, ta, si)
    assert packed.dtype == torch.float16 and packed.shape == (1, 1, st.cut_state_width())
    mu2, ta2, si2 = st.unpack_cut_state(packed)
    exact = float(cut_bound(tn, lower, upper, C, c0, L, U, cuts, mu, al, ta, si)[0])
    again = float(cut_bound(tn, lower, upper, C, c0, L, U, cuts, mu2, al, ta2, si2)[0])
    assert abs(again - exact) <= 2e-3 * (1 + abs(exact))
    first: dict = {}   # one step from the packed state: its first iterate is that bound
    start = float(optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts, iters=1, alphas=al, mu=mu2, taus=ta2,
                                     sigmas=si2, out=first))
    assert start == pytest.approx(again, abs=1e-9)


def test_children_start_from_their_parents_cut_state_in_the_search(monkeypatch):
    """With cuts, every child whose parent was bounded with the same cuts starts from the parent's μ, τ, σ (and
    the smaller steps ``CUT_CHILD_LRS``), going on with its Adam moments where the parent kept them
    (``moment_rows``), the others from the root's μ; the verdict is the plain search's."""
    pytest.importorskip("pyscipopt")
    import time

    from mipprune.verification import bab

    calls = []
    orig = bab._ReluState.optimize

    def spy(self, *a, **kw):
        state, rows = kw.get("state"), kw.get("moment_rows")
        calls.append((state is not None, tuple(a[10]), rows is not None and bool(rows.any())
                      and state.shape[-1] == 3 * self.cut_state_width()))
        return orig(self, *a, **kw)

    monkeypatch.setattr(bab._ReluState, "optimize", spy)
    for seed, eps in [(0, 0.25), (3, 0.25), (5, 0.4), (2, 0.25)]:
        net, spec, blocks, b, rc, disj = _cut_search_case(seed, eps)
        plain = bab.relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60)
        calls.clear()
        r = bab.relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60, cuts=rc,
                         screen=False)
        assert r.status == plain.status
        if sum(1 for inherited, _, _ in calls if inherited) == 0:
            continue
        assert all(lrs == bab.CUT_CHILD_LRS for inherited, lrs, _ in calls if inherited)
        assert not calls[0][0]     # the root's children: from the root's μ
        assert any(with_moments for _, _, with_moments in calls)
        return
    pytest.skip("no case took two generations of children with the cuts")


@pytest.mark.parametrize("seed", range(3))
def test_cut_states_carry_over_to_cuts_that_extend_theirs(seed):
    """Cuts that join a search are a union grown by appending: a domain's state for the older cuts carries over
    (their μ in place, the new cuts' 0, τ and σ by neuron) and bounds the domain as before; cuts that do not
    extend the old ones void the old states."""
    from mipprune.verification.bab import _ReluState

    rng, net, tn, b, lo, hi, lower, upper, L, U = _setup(seed)
    model, cuts9 = _valid_cuts(rng, net, b, lo, hi, tn, K=9)
    from mipprune.verification.cuts import _scipy

    def part(rows):
        return Cuts(_scipy(cuts9.X)[rows], {j: _scipy(A)[rows] for j, A in cuts9.Z.items()},
                    {j: _scipy(A)[rows] for j, A in cuts9.H.items()}, {j: _scipy(A)[rows] for j, A in cuts9.Q.items()},
                    cuts9.d[rows])
    cuts5, other = part(np.arange(5)), part(np.array([1, 0, 2, 3, 4]))
    assert cuts9.extends(cuts5) and cuts5.extends(cuts5) and not cuts5.extends(cuts9) and not cuts9.extends(other)
    C, c0 = tn.tensor(rng.normal(size=(1, 1, 3))), tn.tensor([[0.0]])
    st = _ReluState(tn, lower, upper, L, U, False, cuts=cuts5)
    out: dict = {}
    optimize_cut_bound(tn, lower, upper, C, c0, L, U, cuts5, iters=40, out=out)
    held = (st.cut_gen, st.pack_cut_state(out["mu_last"].clamp(min=0), out["taus"], out["sigmas"])[0])
    mu5, ta5, si5 = st.unpack_cut_state(held[1][None])
    before = float(cut_bound(tn, lower, upper, C, c0, L, U, cuts5, mu5, out["alphas"], ta5, si5)[0])
    st.set_cuts(cuts9, None)
    mu9, ta9, si9 = st.unpack_cut_state(st.current_state(held)[None])
    assert mu9.shape[-1] == 9 and bool((mu9[..., 5:] == 0).all()) and torch.equal(mu9[..., :5], mu5)
    after = float(cut_bound(tn, lower, upper, C, c0, L, U, cuts9, mu9, out["alphas"], ta9, si9)[0])
    # (the new indicator neurons' τ is the root's upper slope in float16: CROWN's triangle to its precision)
    assert after == pytest.approx(before, abs=2e-3 * (1 + abs(before)))
    st.set_cuts(other, None)
    assert st.current_state(held) is None and st.current_state((st.cut_gen, held[1])) is not None


def test_cut_states_are_kept_only_within_the_stores_memory_bound():
    """Cut states fill what the stored domains leave of the store's bound and never end a search: one that does
    not fit is not kept (that child starts from the root's μ), and room comes back as domains leave."""
    from mipprune.verification.bab import _StateBudget

    b = _StateBudget(limit=1000, per_domain=100)
    assert b.admit(5, 300) and b.held == 300          # 500 + 300 <= 1000
    assert not b.admit(6, 200) and b.held == 300      # 600 + 300 + 200 > 1000: not kept, not counted
    assert b.admit(6, 100) and b.held == 400
    b.release(300)
    assert b.admit(6, 200) and b.held == 300
    assert not b.admit(10, 1)                         # the domains alone fill the bound


@pytest.mark.parametrize("seed", range(2))
def test_a_cut_state_packs_its_adam_moments_beside_it(seed):
    """Children go on with their parent's Adam moments of μ, τ, σ: packed (float16, √v for v) three times as wide
    as the state, they come back to float16's precision; a state packed without them has none (Adam's warm start
    itself: ``test_crown.test_adam_rows_warmed_with_earlier_moments_step_on_from_them``)."""
    st, out = _optimized_with_cuts(seed, 20)[-2:]
    (m_mu, m_ta, m_si), (v_mu, v_ta, v_si) = out["moments"]
    assert m_mu.shape == out["mu_last"].shape and bool((v_mu >= 0).all()) and bool((v_mu > 0).any())
    w = st.cut_state_width()
    plain = st.pack_cut_state(out["mu_last"], out["taus"], out["sigmas"])
    packed = st.pack_cut_state(out["mu_last"], out["taus"], out["sigmas"], out["moments"])
    assert plain.shape[-1] == w and packed.shape[-1] == 3 * w and torch.equal(packed[..., :w], plain)
    assert st.unpack_moments(plain) is None
    (mm, mt, ms), (vm, vt, vs) = st.unpack_moments(packed)
    close = lambda a, b: torch.allclose(a, b, rtol=2e-3, atol=1e-4)  # noqa: E731
    assert close(mm, m_mu) and close(vm.sqrt(), v_mu.sqrt())
    assert all(close(mt[j], m_ta[j]) and close(vt[j].sqrt(), v_ta[j].sqrt()) for j in m_ta)
    assert all(close(ms[j], m_si[j]) and close(vs[j].sqrt(), v_si[j].sqrt()) for j in m_si)


def test_a_state_that_does_not_fit_with_its_moments_is_kept_without_them():
    """The store keeps a child's cut state with its moments where they fit, else the state alone, else nothing."""
    from mipprune.verification.bab import _StateBudget

    state = torch.arange(12, dtype=torch.float16).reshape(1, 12)       # a state of width 4 and its two moments
    b = _StateBudget(limit=1000, per_domain=100)
    full = b.hold(5, state, 4)                                         # 500 + 24 <= 1000
    assert torch.equal(full, state) and full.data_ptr() != state.data_ptr() and b.held == 24
    b2 = _StateBudget(limit=520, per_domain=100)
    part = b2.hold(5, state, 4)                                        # 500 + 24 > 520 >= 500 + 8
    assert torch.equal(part, state[:, :4]) and b2.held == 8
    assert _StateBudget(limit=505, per_domain=100).hold(5, state, 4) is None


def test_domains_searched_later_give_up_their_moments_then_their_states_first():
    """Where a child's state with its moments does not fit, stored domains of higher bounds (popped later, if at
    all) give theirs up: their moments first, then their states; domains of lower bounds keep theirs."""
    from mipprune.verification.bab import _StateBudget

    store: dict = {}
    b = _StateBudget(limit=60, per_domain=0, store=store, width_of=lambda gen: 4)   # bytes: 24 whole, 8 state
    full = lambda v: torch.full((1, 12), float(v), dtype=torch.float16)  # noqa: E731  (state 4 wide + moments)

    def put(key, bound):
        held = b.keep(key, bound, len(store) + 1, full(key))
        store[key] = (None, None, None, 0, None if held is None else (0, held))
        return held

    assert put(1, -0.5).shape[-1] == 12 and put(2, -0.1).shape[-1] == 12 and b.held == 48   # both fit whole
    assert put(3, -0.3).shape[-1] == 12                      # room from the domain of the highest bound (key 2) …
    assert store[2][4][1].shape[-1] == 4 and torch.equal(store[2][4][1], full(2)[:, :4])   # … which keeps its state
    assert store[1][4][1].shape[-1] == 12 and b.held == 24 + 24 + 8
    assert put(4, -0.9).shape[-1] == 12                      # key 2 gives up its state, key 3 its moments
    assert store[2][4] is None and store[3][4][1].shape[-1] == 4 and store[1][4][1].shape[-1] == 12
    assert b.held == sum(v[4][1].numel() * 2 for v in store.values() if v[4] is not None)
    held = put(5, 0.7)                                       # the highest bound of all: takes what is left
    assert held is None or held.shape[-1] < 12
    assert store[1][4][1].shape[-1] == 12 and store[4][4][1].shape[-1] == 12
