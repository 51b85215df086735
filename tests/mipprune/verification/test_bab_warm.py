"""Branch and bound's warm starts and options (crown.optimize_bound with α/β init and batch
shrinking, crown.split_intermediate, relu_bab's filtered smart branching and intermediate-bound
updates): every bound stays below sampled minima on its split domain, and every option agrees with
brute force on tiny nets."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mipprune.verification import crown
from mipprune.verification.bab import relu_bab
from mipprune.verification.bounds import compute_bounds
from mipprune.verification.verify import verify
from solvers.errors import InvalidInputError
from tests.mipprune.verification.test_bab import _case, brute_force_case
from tests.mipprune.verification.test_bounds import preactivations, random_net, sample_region
from tests.mipprune.verification.test_verify import exact_min_margin


def _split_domains(seed, n_domains=6):
    """A 3-6-6-6-2 net, its CROWN root bounds and ``n_domains`` random split patterns on unstable
    neurons (1–3 splits each), with samples of the box and which domain each sample lies in."""
    rng = np.random.default_rng(seed)
    net = random_net(rng, [3, 6, 6, 6, 2])
    lo, hi = -np.ones(3), np.ones(3)
    b = compute_bounds(net, lo, hi, "crown")
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    X = sample_region(rng, lo, hi, 6000)
    pre = preactivations(net, X)
    unstable = [(j, k) for j in range(3) for k in np.flatnonzero(b.unstable(j))]
    splits = {j: torch.zeros(n_domains, b.lower[j].size, dtype=tn.dtype) for j in range(3)}
    inside = np.ones((n_domains, X.shape[0]), bool)
    for d in range(n_domains):
        picks = rng.choice(len(unstable), size=min(len(unstable), int(rng.integers(1, 4))), replace=False)
        for p in picks:
            j, k = unstable[p]
            s = int(rng.choice([-1, 1]))
            splits[j][d, k] = s
            inside[d] &= (pre[j][:, k] >= 0) if s > 0 else (pre[j][:, k] <= 0)
    return net, tn, b, lo, hi, X, pre, splits, inside


@pytest.mark.parametrize("seed", range(4))
def test_split_intermediate_bounds_are_sound_and_tighter_than_the_root(seed):
    net, tn, b, lo, hi, X, pre, splits, inside = _split_domains(seed)
    D = inside.shape[0]
    rl = [tn.tensor(a)[None] for a in b.lower[:3]]
    ru = [tn.tensor(a)[None] for a in b.upper[:3]]
    L, U = tn.box(lo, hi)
    lower, upper = crown.split_intermediate(tn, rl, ru, splits, L.expand(D, -1), U.expand(D, -1))
    for d in range(D):
        for j in range(3):
            l, u = lower[j][d].numpy(), upper[j][d].numpy()
            assert np.all(l >= b.lower[j] - 1e-12) and np.all(u <= b.upper[j] + 1e-12)
            if inside[d].any():
                z = pre[j][inside[d]]
                assert np.all(z >= l - 1e-9) and np.all(z <= u + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_warm_started_and_shrinking_optimization_stays_sound(seed, monkeypatch):
    """α/β optimized on a batch of split domains (domains leave the batch as they are proven), then
    reused as the start of a second run: both bounds stay below every sample of each domain, and
    the second run's start is exactly the bound at the returned parameters."""
    net, tn, b, lo, hi, X, pre, splits, inside = _split_domains(seed)
    D = inside.shape[0]
    lower, upper = [], []
    for j in range(3):
        l, u = crown.apply_splits(tn.tensor(b.lower[j])[None].expand(D, -1), tn.tensor(b.upper[j])[None].expand(D, -1),
                                  splits[j])
        lower.append(l)
        upper.append(u)
    Y = net.forward(X)
    C = tn.tensor([[1.0, -1.0], [-1.0, 1.0]])[None].expand(D, -1, -1)
    # half the domains get margins shifted far up: proven at once, they leave the batch
    low = (Y @ C[0].numpy().T).min(axis=0)
    shift = np.where(np.arange(D)[:, None] % 2 == 0, 10.0 * (1 + np.abs(low)), -0.5 * np.minimum(low, 0))
    c0 = torch.as_tensor(shift, dtype=tn.dtype)
    L, U = tn.box(lo, hi)
    shrinks = []
    keep = crown._Ascent.keep
    monkeypatch.setattr(crown._Ascent, "keep", lambda self, mask: (shrinks.append(int(mask.sum())), keep(self, mask)))
    out: dict = {}
    lb, _, _, _ = crown.optimize_bound(tn, lower, upper, C, c0, L.expand(D, -1), U.expand(D, -1), splits=splits,
                                       iters=25, out=out)
    for d in range(D):
        if inside[d].any():
            margins = Y[inside[d]] @ C[0].numpy().T + c0[d].numpy()
            assert np.all(lb[d].numpy() <= margins.min(axis=0) + 1e-9)
    assert shrinks and shrinks[0] < D          # the proven domains left the batch
    assert all(a.shape[0] == D for a in out["alphas"].values())
    assert all(bool((a >= 0).all() and (a <= 1).all()) for a in out["alphas"].values())
    assert all(bool((t >= 0).all()) for t in out["betas"].values())
    lb0, _, _, _ = crown.optimize_bound(tn, lower, upper, C, c0, L.expand(D, -1), U.expand(D, -1), splits=splits,
                                        iters=0, alphas=out["alphas"], betas=out["betas"])
    ref = crown.backward_bound(tn, lower, upper, C, c0, L.expand(D, -1), U.expand(D, -1), alphas=out["alphas"],
                               betas=out["betas"], splits=splits)[0]
    assert torch.equal(lb0, ref)
    for d in range(D):
        if inside[d].any():
            margins = Y[inside[d]] @ C[0].numpy().T + c0[d].numpy()
            assert np.all(lb0[d].numpy() <= margins.min(axis=0) + 1e-9)


OPTIONS = [{"candidates": 4}, {"intermediate": True}, {"iters": 3, "candidates": 3, "intermediate": True},
           {"screen": True}, {"screen": False}, {"clauses": True, "batch": 4}]


@pytest.mark.parametrize("seed,eps", [(s, e) for s in range(4) for e in (0.1, 0.3)])
def test_relu_bab_options_agree_with_brute_force(seed, eps):
    net, spec, truth, blocks, b, disj = brute_force_case(seed, eps)
    for opts in OPTIONS:
        r = relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 20, **opts)
        if truth > 0:
            assert r.status == "verified", (opts, r.message)
        else:
            assert r.status == "falsified", (opts, r.message)
            assert spec.is_counterexample(net, r.counterexample)


def test_screening_proves_children_with_the_parents_alpha_beta_and_decides_alike():
    """``screen``: children the parent's α/β already prove are not optimized; the search still ends
    verified, and some child is screened on a net that needs branching."""
    net, spec = _case(2, 0.25, (8, 24, 24, 24, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    disj = list(range(len(spec.disjuncts)))
    runs = {s: relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60, screen=s)
            for s in (False, True)}
    assert runs[False].domains > 3, "the case must need branching"
    assert runs[True].status == runs[False].status == "verified"
    assert runs[True].info.get("screened", 0) > 0 and "screened" not in runs[False].info
    # about the same tree: a screened child would be proven by its optimization too (up to batch round-off)
    assert runs[True].domains <= runs[False].domains + 4


def test_unknown_bab_options_are_refused_in_the_users_terms():
    net, spec = _case(0, 0.1, (3, 5, 4, 4, 3))
    with pytest.raises(InvalidInputError, match="bab_options keys must be among"):
        verify(net, spec, time_limit=5, bab_options={"iterations": 3})


@pytest.mark.parametrize("seed", range(5))
def test_alpha_optimized_intermediate_bounds_are_sound_and_tighten_crown(seed):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [4, 8, 8, 8, 8, 3])
    lo, hi = -np.ones(4), np.ones(4)
    b = compute_bounds(net, lo, hi, "crown")
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    L, U = tn.box(lo, hi)
    lower, upper, done = crown.optimized_intermediate(tn, L, U, [tn.tensor(a)[None] for a in b.lower[:4]],
                                                      [tn.tensor(a)[None] for a in b.upper[:4]], iters=20)
    assert done == 4
    pre = preactivations(net, sample_region(rng, lo, hi, 4000))
    widths = []
    for i in range(4):
        l, u = lower[i][0].numpy(), upper[i][0].numpy()
        assert np.all(l >= b.lower[i] - 1e-12) and np.all(u <= b.upper[i] + 1e-12)
        assert np.all(pre[i] >= l - 1e-9) and np.all(pre[i] <= u + 1e-9)
        widths.append(((u - l).sum(), (b.upper[i] - b.lower[i]).sum()))
    assert sum(w for w, _ in widths) <= sum(w for _, w in widths)


def test_verify_through_alpha_bounds_and_branch_and_bound_agrees_with_brute_force():
    """The branch-and-bound path (α-CROWN intermediate bounds, then ReLU splits): verdicts match
    enumeration."""
    for seed, eps in [(s, e) for s in range(4) for e in (0.3, 0.6)]:
        net, spec = _case(seed, eps, (3, 5, 4, 4, 3))
        truth = exact_min_margin(net, spec)
        if abs(truth) < 1e-6:
            continue
        r = verify(net, spec, time_limit=20, complete="bab")
        if truth > 0:
            assert r.verdict.value == "verified", r.message
        else:
            assert r.verdict.value == "falsified" and spec.is_counterexample(net, r.counterexample)


def test_stored_domains_are_capped_by_their_bytes(monkeypatch):
    """Warm-start α/β make a stored domain larger: the store's byte cap bounds memory too."""
    from mipprune.verification import bab

    net, spec = _case(0, 0.1, (6, 40, 40, 40, 3))    # open after the root, not falsified at once
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "interval")
    monkeypatch.setattr(bab, "MAX_STORE_BYTES", 1)
    r = relu_bab(net, spec, blocks, b.lower, b.upper, list(range(len(spec.disjuncts))), deadline=None, batch=4)
    assert r.status == "unknown" and "domain limit of 1 reached" in r.message
    monkeypatch.undo()   # the caller's cap, given per search
    r = relu_bab(net, spec, blocks, b.lower, b.upper, list(range(len(spec.disjuncts))), deadline=None, batch=4,
                 max_store_bytes=1)
    assert r.status == "unknown" and "domain limit of 1 reached" in r.message


def test_store_limits_are_the_devices_unless_given():
    import torch

    from mipprune.verification import bab

    cpu = torch.device("cpu")
    assert bab.store_limits(cpu, None, None) == (bab.MAX_DOMAINS, bab.MAX_STORE_BYTES)
    assert bab.store_limits(cpu, 7, 1e6) == (7, 1_000_000)


def test_a_search_that_runs_the_device_out_of_memory_ends_unknown_and_the_milp_finishes(monkeypatch):
    """Out of device memory mid-search: ``unknown`` with the reason (not an error), and verify()
    hands the rest of the time to the MILP."""
    import torch

    from mipprune.verification import bab
    from tests.mipprune.verification.test_verify import _needs_milp_case

    def oom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bab, "_search_rows", oom)
    monkeypatch.setattr(bab, "_input_search", oom)
    net, spec = _case(0, 0.1, (6, 40, 40, 40, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "interval")
    r = relu_bab(net, spec, blocks, b.lower, b.upper, list(range(len(spec.disjuncts))), deadline=None, root_iters=0)
    assert r.status == "unknown" and "device memory full" in r.message
    r = bab.input_bab(net, spec, blocks, list(range(len(spec.disjuncts))), deadline=None)
    assert r.status == "unknown" and "device memory full" in r.message
    net, spec = _needs_milp_case()
    r = verify(net, spec, time_limit=60, complete="bab")
    assert r.verdict.value == "verified" and r.stage == "milp", r.message


def test_a_time_out_records_why_branch_and_bound_handed_over(monkeypatch):
    """BaB stops at its domain cap, the MILP then runs out of time: the time-out's message says both."""
    from mipprune.verification import verify as verify_mod

    from solvers.milp import MilpSolution
    from solvers.result import Status

    monkeypatch.setattr(verify_mod, "_solve", lambda model, backend, tl: MilpSolution(Status.TIME_LIMIT, None, None,
                                                                                       None, 0, 0.0))
    from tests.mipprune.verification.test_verify import _needs_milp_case

    from mipprune.verification import bab

    monkeypatch.setattr(bab, "relu_bab", lambda *a, **k: bab.BabResult("unknown", message="domain limit of 7 "
                                                                        "reached (memory bound)"))
    net, spec = _needs_milp_case()
    r = verify(net, spec, time_limit=30, complete="bab", attack=False)
    assert r.verdict.value == "timeout", r.message
    assert "during the MILP" in r.message and "domain limit of 7 reached" in r.message, r.message


def test_verify_threads_sets_the_searches_torch_threads_and_restores_them(monkeypatch):
    """``verify(threads=2)``: branch and bound runs on two intra-op threads (one by default), the
    caller's setting is back afterwards, and a bad count is refused in the user's terms."""
    import torch

    from mipprune.verification import bab

    seen: list[int] = []
    real = bab.relu_bab

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(bab, "relu_bab", recording)
    net, spec = _case(4, 0.6, (3, 5, 4, 4, 3))         # decided by branch and bound (its root)
    before = torch.get_num_threads()
    for threads in (1, 2):
        seen.clear()
        r = verify(net, spec, time_limit=20, complete="bab", attack=False, threads=threads)
        assert seen and set(seen) == {threads}, (threads, seen, r.message)
        assert torch.get_num_threads() == before
    with pytest.raises(InvalidInputError, match="threads must be an integer >= 1"):
        verify(net, spec, threads=0)


def test_precision_float32_decides_like_the_milp_and_is_scoped_to_the_call():
    """verify(precision="float32") runs the bound engine in float32 (with its round-off margin) even on
    the CPU: the verdicts every complete path agrees on; the setting ends with the call."""
    from tests.mipprune.verification.test_residual_pooling import E2E, e2e_case

    seen = []
    real = crown.TorchNet.from_blocks.__func__

    def spy(cls, *a, **k):
        net_ = real(cls, *a, **k)
        seen.append(net_.dtype)
        return net_

    for name, seed, eps, expected in E2E:
        net, spec = e2e_case(name, seed, eps)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(crown.TorchNet, "from_blocks", classmethod(spy))
            r = verify(net, spec, time_limit=30, complete="bab", bounds_method="crown", attack=False,
                       precision="float32")
        assert r.verdict == expected, (name, r.message)
        if expected.value == "falsified":
            assert spec.is_counterexample(net, r.counterexample)
    assert seen and set(seen) == {torch.float32}
    assert crown.PRECISION.get() is None
    assert crown.TorchNet.from_blocks(net.to_affine_relu()).dtype == torch.float64
    with pytest.raises(InvalidInputError, match="precision must be one of"):
        verify(net, spec, precision="half")
