"""Branch and bound (bab.py): verdicts agree with brute force (activation-pattern enumeration) on
tiny nets, counterexamples pass the float64 re-check, deadlines and the domain cap are honoured,
and the small-input control family is decided by input splitting."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mipprune.verification.bab import input_bab, relu_bab
from mipprune.verification.bounds import compute_bounds
from mipprune.verification.verify import verify
from solvers.network.ir import Network
from solvers.network.layers import Dense, ReLU
from solvers.network.spec import Spec
from solvers.result import Verdict
from tests.mipprune.verification.test_bounds import random_net
from tests.mipprune.verification.test_verify import exact_min_margin


def _case(seed, eps, sizes):
    rng = np.random.default_rng(seed)
    net = random_net(rng, list(sizes))
    x0 = rng.uniform(0.3, 0.7, size=sizes[0])
    label = int(np.argmax(net.forward(x0)))
    return net, Spec.robustness(x0, eps, label, sizes[-1])


CASES = [(s, e) for s in range(6) for e in (0.1, 0.3)]


def brute_force_case(seed, eps):
    """A small net and property with its exact minimum margin (skipped on the decision boundary),
    its affine/ReLU blocks, CROWN bounds and every disjunct: what a BaB-vs-brute-force test needs."""
    net, spec = _case(seed, eps, (3, 5, 4, 4, 3))
    truth = exact_min_margin(net, spec)
    if abs(truth) < 1e-6:
        pytest.skip("on the decision boundary")
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    return net, spec, truth, net.to_affine_relu(), b, list(range(len(spec.disjuncts)))


@pytest.mark.parametrize("seed,eps", CASES)
def test_relu_and_input_bab_agree_with_brute_force(seed, eps):
    net, spec, truth, blocks, b, disj = brute_force_case(seed, eps)
    for r in (relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 30),
              input_bab(net, spec, blocks, disj, deadline=time.perf_counter() + 30)):
        if truth > 0:
            assert r.status == "verified", r.message
        else:
            assert r.status == "falsified", r.message
            assert spec.is_counterexample(net, r.counterexample)


def test_relu_bab_deadline_and_domain_cap_are_honoured():
    net, spec = _case(3, 0.6, (6, 40, 40, 40, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "interval")
    disj = list(range(len(spec.disjuncts)))
    t = time.perf_counter()
    r = relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=t + 0.5)
    assert time.perf_counter() - t < 2.0
    assert r.status in ("timeout", "falsified", "verified")
    if r.status == "falsified":
        assert spec.is_counterexample(net, r.counterexample)
    r = relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=None, max_domains=4, batch=4)
    assert r.status in ("unknown", "falsified", "verified")
    if r.status == "unknown":
        assert "domain limit" in r.message


def control_network(seed: int = 0, width: int = 50, depth: int = 6) -> Network:
    """A control-policy-style network: 5 inputs, ``depth`` hidden layers of ``width`` ReLUs, one
    action, fitted briefly to a smooth control law (synthetic task)."""
    torch.set_num_threads(1)   # two OpenMP threads on a loaded 2-core machine: 80x slower
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(512, 5, generator=g) * 2 - 1
    y = (torch.tanh(1.5 * X[:, 0] - 0.8 * X[:, 1] + 0.5 * X[:, 2] * X[:, 3]) + 0.3 * torch.sin(2 * X[:, 4]))[:, None]
    torch.manual_seed(seed)
    mods = []
    for i in range(depth):
        mods += [torch.nn.Linear(5 if i == 0 else width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods, torch.nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    layers = [Dense(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
              if isinstance(m, torch.nn.Linear) else ReLU() for m in model]
    return Network(layers, (5,))


def test_small_input_family_is_decided_by_input_splitting():
    net = control_network(0)
    rng = np.random.default_rng(0)
    for k in range(3):
        c = rng.uniform(-0.5, 0.5, 5)
        lo, hi = c - 0.1, c + 0.1
        ys = net.forward(rng.uniform(lo, hi, (4000, 5)))[:, 0]
        for thr, sat in ((ys.max() + 0.1, False), (ys.max() - 1e-3, True)):
            spec = Spec(lo, hi, ((np.array([[-1.0]]), np.array([-thr])),))   # unsafe: y >= thr
            r = verify(net, spec, time_limit=20)
            assert r.stage in ("input", "bounds", "attack"), r.message
            if sat:   # a sampled point beats the threshold: must be falsified, re-checked in float64
                assert r.verdict is Verdict.FALSIFIED and spec.is_counterexample(net, r.counterexample)
            else:     # sampling says nothing: the verdict may be either, but never wrong
                assert r.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED)
                if r.verdict is Verdict.FALSIFIED:
                    assert spec.is_counterexample(net, r.counterexample)


@pytest.mark.parametrize("complete", ["bab", "input"])
def test_verify_honours_the_time_limit_on_a_hard_query(complete):
    """A 12-input, 4x100 random net that neither path settles in 1.5 s (found by a search; before
    the batch planner, input splitting overran this by up to 1.8 s): TIMEOUT, never VERIFIED,
    within the limit plus a second."""
    net, spec = _case(0, 0.15, (12, 100, 100, 100, 100, 3))
    t = time.perf_counter()
    r = verify(net, spec, time_limit=1.5, complete=complete)
    assert time.perf_counter() - t < 2.5
    assert r.verdict is Verdict.TIMEOUT and "time limit" in r.message and r.counterexample is None


def test_when_branch_and_bound_gives_up_the_milp_finishes_the_query(monkeypatch):
    import mipprune.verification.bab as bab_mod

    def capped(*args, **kw):   # a search that hits its domain cap at once
        return bab_mod.BabResult("unknown", message="domain limit of 0 reached (memory bound)")

    monkeypatch.setattr(bab_mod, "input_bab", capped)
    monkeypatch.setattr(bab_mod, "relu_bab", capped)
    from tests.mipprune.verification.test_verify import _needs_milp_case

    net, spec = _needs_milp_case()
    for complete in ("input", "bab"):
        r = verify(net, spec, time_limit=60, complete=complete)
        assert r.verdict is Verdict.VERIFIED and r.stage == "milp" and r.milp_binaries > 0


def test_a_timed_out_search_reports_its_frontier_against_the_root():
    # the 12-input 4x100 net of the time-limit test: branch and bound cannot close it in a second
    net, spec = _case(0, 0.15, (12, 100, 100, 100, 100, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    r = relu_bab(net, spec, blocks, b.lower, b.upper, list(range(len(spec.disjuncts))),
                 deadline=time.perf_counter() + 1.0)
    assert r.status == "timeout"
    assert "worst open domain's margin bound" in r.message and "> 0 proves it" in r.message
    # best first: the frontier's worst domain is never below the root's worst open disjunct, and still <= 0
    assert r.info["root_open_lb"] - 1e-9 <= r.info["open_lb"] <= 1e-9


def test_pgd_runs_less_often_the_longer_it_finds_nothing(monkeypatch):
    """The PGD interval of a search starts at PGD_EVERY, stretches after each fruitless PGD, and is
    capped; the float64 re-check of the candidates still runs every time."""
    from mipprune.verification import bab

    now = [100.0]
    monkeypatch.setattr(bab.time, "perf_counter", lambda: now[0])
    calls = {"check": 0, "pgd": 0}

    class Check:
        def __call__(self, cand):
            calls["check"] += 1
            return None

        def pgd(self, starts, time_limit):
            calls["pgd"] += 1
            return None

    clock = bab._PgdClock()
    times = []
    for step in range(2000):                       # one batch every 0.1 s for 200 s
        now[0] = 100.0 + 0.1 * (step + 1)
        before = calls["pgd"]
        assert bab._search_counterexample(Check(), np.zeros((1, 2)), clock, None) is None
        if calls["pgd"] > before:
            times.append(now[0] - 100.0)
    assert calls["check"] == 2000
    gaps = np.diff([0.0] + times)
    assert gaps[0] == pytest.approx(bab.PGD_EVERY, abs=0.11)
    assert np.all(np.diff(gaps) >= -0.11)                      # never more often than before
    assert gaps[-1] <= bab.PGD_EVERY_MAX + 0.11 and gaps.max() > 4 * bab.PGD_EVERY
    assert 8 <= len(times) < 200 / bab.PGD_EVERY / 2        # fewer than half the fixed schedule's 80


@pytest.mark.parametrize("eps", [0.025, 0.03])   # verified after a split / falsified at the root
def test_relu_bab_with_convolution_products_decides_like_with_csr(monkeypatch, eps):
    """``conv=True``: the float32 steps run the conv blocks as conv2d / conv_transpose2d (they are called), and
    the search decides as with CSR products and as the MILP."""
    from mipprune.verification import crown
    from tests.mipprune.verification.test_crown import _conv_net
    from tests.mipprune.verification.test_residual_pooling import _robustness

    rng = np.random.default_rng(5)
    net = _conv_net(rng)
    spec = _robustness(net, rng.uniform(-1, 1, size=net.n_inputs), eps)
    truth = verify(net, spec, time_limit=60, complete="milp").verdict
    calls = []
    real = crown._ConvTerm.back
    monkeypatch.setattr(crown._ConvTerm, "back", lambda self, Lz: calls.append(1) or real(self, Lz))
    blocks, b = net.to_affine_relu(), compute_bounds(net, spec.lower, spec.upper, "crown")
    for conv in (False, True):
        r = relu_bab(net, spec, blocks, b.lower, b.upper, list(range(len(spec.disjuncts))),
                     deadline=time.perf_counter() + 30, conv=conv, root_iters=0)
        assert r.status == {Verdict.VERIFIED: "verified", Verdict.FALSIFIED: "falsified"}[truth], (conv, r.message)
        assert (len(calls) > 0) == (conv and r.domains > 1)
    assert truth == (Verdict.VERIFIED if eps < 0.03 else Verdict.FALSIFIED)
