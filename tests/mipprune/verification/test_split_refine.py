"""Split-refined intermediate bounds (:mod:`mipprune.verification.split_refine`): sound against
sampling and against the exact (MILP) ranges, never looser than where they start, tighter than
α-CROWN, time-boxed, and the verifier's verdicts unchanged when it runs."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from mipprune.verification.bounds import compute_bounds
from mipprune.verification import split_refine
from mipprune.verification.split_refine import split_refine_bounds
from mipprune.verification.verify import _wants_split_refine, verify
from solvers.network.spec import Spec, make_region
from solvers.milp import build_milp, solve_highs
from solvers.result import Status, Verdict
from tests.mipprune.verification.test_bounds import preactivations, random_net, sample_region


def _case(seed, sizes=(4, 10, 10, 10, 3), half=0.6):
    rng = np.random.default_rng(seed)
    net = random_net(rng, list(sizes))
    c = rng.uniform(-0.5, 0.5, sizes[0])
    return rng, net, c - half, c + half


def exact_ranges(blocks, lower, upper, lo, hi):
    """The exact range of every hidden pre-activation: two MILPs per neuron (HiGHS, solved to optimality)."""
    region = make_region(lo.size, lo, hi)
    out = []
    for i in range(len(blocks) - 1):
        model = build_milp(blocks[:i + 1], lower[:i + 1], upper[:i + 1], region)
        n = blocks[i].shape[0]
        rng_ = np.zeros((2, n))
        for k in range(n):
            for side, sign in ((0, 1.0), (1, -1.0)):
                sol = solve_highs(model.with_objective(sign * np.eye(n)[k]))
                assert sol.status is Status.OPTIMAL
                rng_[side, k] = sign * sol.objective
        out.append(rng_)
    return out


@pytest.mark.parametrize("seed,focus", [(0, "off"), (1, "off"), (0, "last"), (1, "all")])
def test_split_refined_bounds_contain_the_exact_ranges_and_tighten_crown(seed, focus):
    rng, net, lo, hi = _case(seed, sizes=(4, 8, 8, 8, 3))
    crown = compute_bounds(net, lo, hi, "crown")
    blocks = net.to_affine_relu()
    # rows weighed by a property (focus "last"/"all") or all alike: sound either way
    objective = (rng.normal(size=(2, 3)), np.zeros(2))
    low, up, info = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=2.0,
                                        objective=objective, focus=focus)
    exact = exact_ranges(blocks, crown.lower, crown.upper, lo, hi)
    for i in range(1, len(low) - 1):
        # never looser than the start, and sound: the exact range of every neuron inside (HiGHS's
        # optimum is exact up to its 1e-7 tolerances)
        assert np.all(low[i] >= crown.lower[i]) and np.all(up[i] <= crown.upper[i])
        tol = 1e-6 * (1 + np.abs(exact[i]))
        assert np.all(low[i] <= exact[i][0] + tol[0]), f"block {i}: lower bound above the exact minimum"
        assert np.all(up[i] >= exact[i][1] - tol[1]), f"block {i}: upper bound below the exact maximum"
    X = sample_region(rng, lo, hi, 4000)
    for i, Z in enumerate(preactivations(net, X)[:-1]):
        assert np.all(Z >= low[i] - 1e-9) and np.all(Z <= up[i] + 1e-9), f"block {i}"
    # the splits see through the relaxation: strictly tighter than CROWN somewhere
    width = lambda L, U: sum(float(np.sum(U[i] - L[i])) for i in range(1, len(L) - 1))  # noqa: E731
    assert width(low, up) < width(crown.lower, crown.upper) - 1e-3
    assert sum(info.leaves) > 0 and info.blocks == [1, 2]


def test_split_refinement_honours_its_time_box_and_stop():
    rng, net, lo, hi = _case(3, sizes=(20, 64, 64, 64, 64, 4), half=1.0)
    crown = compute_bounds(net, lo, hi, "crown")
    blocks = net.to_affine_relu()
    t = time.perf_counter()
    low, up, info = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=1.0)
    assert time.perf_counter() - t < 2.5
    calls = []
    _, _, info2 = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=5.0,
                                      stop=lambda L, U: calls.append(1) or True)
    assert info2.stopped and calls == [1] and info2.blocks == [1]
    # the output block is passed through untouched
    assert np.array_equal(low[-1], crown.lower[-1]) and np.array_equal(up[-1], crown.upper[-1])


def test_split_refinement_checks_stop_during_the_last_hidden_block_with_sound_partial_bounds():
    """The last hidden block's bounds feed the output directly: ``stop`` is asked while it is being
    refined (not only after it), so a query proven half-way ends there; every bound it sees is sound."""
    rng, net, lo, hi = _case(3, sizes=(20, 64, 64, 64, 64, 4), half=1.0)
    crown = compute_bounds(net, lo, hi, "crown")
    blocks = net.to_affine_relu()
    X = sample_region(rng, lo, hi, 2000)
    Z = preactivations(net, X)
    seen = []

    def stop(L, U):
        seen.append((L, U))
        return len(seen) == 3

    t = time.perf_counter()
    low, up, info = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=6.0, layers=[3],
                                        stop=stop, check_every=0.0)
    # three calls, all during block 3 (one per search step), then it ended: far from its 6 s
    assert len(seen) == 3 and info.stopped and info.blocks == [3]
    assert time.perf_counter() - t < 4.0 and info.block_time[0] < 4.0
    for L, U in seen + [(low, up)]:
        for i, z in enumerate(Z[:-1]):
            assert np.all(z >= L[i] - 1e-9) and np.all(z <= U[i] + 1e-9), f"block {i}"
        assert np.all(L[3] >= crown.lower[3]) and np.all(U[3] <= crown.upper[3])
    # the search made progress between the calls: the last bounds seen are tighter than the first
    assert np.sum(seen[-1][1][3] - seen[-1][0][3]) < np.sum(seen[0][1][3] - seen[0][0][3])


def _near_exact_minimum(seed: int, offset: float):
    """A 3-input 3×12 net and the spec "unsafe: ``y_k − y_j <= m* + offset``" on its box, with ``k, j`` the
    top two outputs at the centre and ``m*`` the exact minimum of ``y_k − y_j`` (a solved MILP): safe iff
    offset < 0."""
    rng, net, lo, hi = _case(seed, sizes=(3, 12, 12, 12, 3), half=0.5)
    y = net.forward(((lo + hi) / 2)[None])[0]
    k, j = int(np.argmax(y)), int(np.argsort(y)[-2])
    row = np.zeros(3)
    row[k], row[j] = 1.0, -1.0
    crown = compute_bounds(net, lo, hi, "crown")
    sol = solve_highs(build_milp(net.to_affine_relu(), crown.lower, crown.upper,
                                 make_region(3, lo, hi)).with_objective(row))
    assert sol.status is Status.OPTIMAL
    return net, Spec(lo, hi, ((row[None], np.array([sol.objective + offset])),))


@pytest.mark.parametrize("seed", [4, 6])
@pytest.mark.parametrize("offset", [-0.05, 0.05])
def test_verify_with_split_refinement_decides_near_the_exact_minimum(seed, offset, monkeypatch):
    """Unsafe: ``y_k − y_j <= m* + offset``, ``m*`` the exact minimum (a solved MILP): safe iff offset < 0."""
    import mipprune.verification.verify as V

    monkeypatch.setattr(V, "SPLIT_PROBE_SHARE", 1e-9)   # no first branch and bound: the refinement runs
    net, spec = _near_exact_minimum(seed, offset)
    r = verify(net, spec, time_limit=30, complete="bab", refine="split")
    assert r.verdict is (Verdict.VERIFIED if offset < 0 else Verdict.FALSIFIED), r.message
    if offset < 0:
        assert "split-refined" in r.message
    else:
        assert spec.is_counterexample(net, r.counterexample)


@pytest.mark.parametrize("offset", [-0.05, 0.05])
def test_a_branch_and_bound_during_the_refinement_decides_with_sound_verdicts(offset, monkeypatch):
    """With a short branch and bound tried on the bounds so far at every ``stop`` call, a safe query is
    verified there (stage "bab", after the first refined block); an unsafe one still comes back
    falsified with a float64 counterexample (here from the MILP: these branch-and-bound tries search
    bounds, not points)."""
    import mipprune.verification.verify as V

    monkeypatch.setattr(V, "SPLIT_PROBE_SHARE", 1e-9)
    monkeypatch.setattr(V, "SPLIT_BAB_EVERY", 0.0)
    net, spec = _near_exact_minimum(4, offset)
    r = verify(net, spec, time_limit=30, complete="bab", refine="split", attack=False)   # no PGD before it
    assert r.verdict is (Verdict.VERIFIED if offset < 0 else Verdict.FALSIFIED), r.message
    if offset < 0:
        assert r.stage == "bab" and "during the refinement" in r.message, r.message
        # the first try came after block 1: block 2 was never refined
        assert "block 1:" in r.message and "block 2:" not in r.message, r.message
    else:
        assert spec.is_counterexample(net, r.counterexample)


def test_auto_split_refines_only_deep_fully_connected_networks():
    rng = np.random.default_rng(0)
    deep, shallow = random_net(rng, [30, 20, 20, 20, 3]), random_net(rng, [30, 20, 20, 3])
    lo, hi = -np.ones(30), np.ones(30)
    for net, want in ((deep, True), (shallow, False)):
        b = compute_bounds(net, lo, hi, "crown")
        assert _wants_split_refine("auto", net.to_affine_relu(), b) is want
        assert _wants_split_refine("off", net.to_affine_relu(), b) is False


def test_weighted_rows_share_the_leaves_in_proportion_and_light_rows_still_advance():
    torch = pytest.importorskip("torch")
    weight = split_refine._floored(torch.tensor([8.0, 1.0, 0.0, 1e-9, 3.0]))
    assert float(weight[2]) == pytest.approx(split_refine.WEIGHT_FLOOR * 8.0)   # floored, never zero
    live = torch.tensor([True, True, True, True, False])
    credit = torch.zeros(5, dtype=torch.float64)
    got = torch.zeros(5, dtype=torch.long)
    steps = 200
    for _ in range(steps):
        quota, credit = split_refine._quotas(credit, weight, live, per_row=2)
        got += quota
        assert int(quota[4]) == 0 and float(credit[4]) == 0.0      # a dead row gets nothing
    # the live rows split 2 leaves per live row and step between them, in proportion to the weights
    assert int(got.sum()) == pytest.approx(2 * 4 * steps, abs=4)
    share = got[:4].double() / got[:4].sum()
    expect = weight[:4] / weight[:4].sum()
    assert torch.allclose(share, expect, atol=0.01)
    assert int(got[2]) > 0 and int(got[3]) > 0                   # the floored rows advance too
    assert torch.equal(split_refine._floored(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


def test_spec_weights_follow_the_property_and_the_triangle():
    """A last-block neuron the property does not read weighs nothing (before the floor); for a read one,
    raising ``l`` weighs ``u²/(u−l)²`` and lowering ``u`` weighs ``l²/(u−l)²`` (times the coefficient)."""
    torch = pytest.importorskip("torch")
    from mipprune.verification.crown import TorchNet
    rng, net, lo, hi = _case(4, sizes=(3, 6, 4, 2))
    blocks = net.to_affine_relu()
    tn = TorchNet.from_blocks(blocks)
    tn.W[2][:, 1] = 0.0                      # the output reads nothing of last-block neuron 1
    tlo, thi = tn.box(lo, hi)
    crown = compute_bounds(net, lo, hi, "crown")
    lw = [tn.tensor(a)[None] for a in crown.lower[:2]]
    up = [tn.tensor(a)[None] for a in crown.upper[:2]]
    l = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=tn.dtype)
    u = torch.tensor([[3.0, 2.0, 0.5, 1.0]], dtype=tn.dtype)
    C = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=tn.dtype)   # both signs: every read neuron counts
    weigh = split_refine._spec_weights(tn, 1, lw, up, C, torch.zeros(2, dtype=tn.dtype), tlo, thi)
    idx = torch.arange(4)
    w = weigh(l, u, idx)
    assert w.shape == (8,) and bool((w >= 0).all())
    assert float(w[1]) == 0.0 and float(w[4 + 1]) == 0.0
    # the coefficient ν⁻ of each neuron, recovered from the lower row's weight, gives the upper row's
    for j in range(4):
        if float(w[j]) > 0:
            nu = float(w[j]) * float(u[0, j] - l[0, j]) ** 2 / float(u[0, j]) ** 2
            assert float(w[4 + j]) == pytest.approx(nu * float(l[0, j]) ** 2 / float(u[0, j] - l[0, j]) ** 2)
    assert sum(float(w[j]) > 0 for j in (0, 2, 3)) == 3


def test_a_stalled_block_hands_its_time_to_the_later_blocks(monkeypatch):
    """With ``stall`` a block's search ends once its intervals stop shrinking fast enough: an impossible rate
    (its whole width per window) ends every block after one window, well inside the time box, and the
    bounds stay sound; the verifier asks for it only off fully connected nets."""
    from mipprune.verification import verify as V

    rng, net, lo, hi = _case(3, sizes=(20, 64, 64, 64, 4), half=1.0)
    crown = compute_bounds(net, lo, hi, "crown")
    blocks = net.to_affine_relu()
    monkeypatch.setattr(split_refine, "STALL_WINDOW", 0.3)
    t = time.perf_counter()
    low, up, info = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=20.0, stall=1.0)
    took = time.perf_counter() - t
    assert info.blocks == [1, 2] and took < 8.0, f"{took:.1f} s: the stall rule did not end the blocks"
    assert all(t_b < 4.0 for t_b in info.block_time)
    # no block shrank by its whole width: none re-runs the later blocks' α-CROWN (without stall, block 1 does)
    assert info.rerun_time == [0.0, 0.0]
    assert "α re-run" not in info.summary()
    _, _, plain = split_refine_bounds(blocks, crown.lower, crown.upper, lo, hi, time_limit=2.0)
    assert plain.rerun_time[0] > 0 and "α re-run" in plain.summary()
    X = sample_region(rng, lo, hi, 2000)
    for i, Z in enumerate(preactivations(net, X)[:-1]):
        assert np.all(Z >= low[i] - 1e-9) and np.all(Z <= up[i] + 1e-9), f"block {i}"
        assert np.all(low[i] >= crown.lower[i]) and np.all(up[i] <= crown.upper[i])
    assert V._fully_connected(blocks)
    conv = list(blocks)
    W = conv[1].weight.tolil()
    W[:, :56] = 0.0   # 1/8 dense, like a convolution
    conv[1] = dataclasses.replace(conv[1], weight=W.tocsr())
    assert not V._fully_connected(conv)


def test_branch_and_bound_tries_during_the_refinement_back_off(monkeypatch):
    """The tries come after ``SPLIT_BAB_EVERY`` seconds, then each failed one doubles the wait: with a stop
    call every second for 100 s (a fake clock), at 0, 10, 30 and 70 s."""
    import types

    import mipprune.verification.bab as B
    import mipprune.verification.verify as V
    from mipprune.verification.split_refine import SplitRefineInfo

    now = [0.0]
    tries = []
    monkeypatch.setattr(V, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(V, "_row_margins", lambda *a: (np.array([-1.0]), None))   # never proven by CROWN
    monkeypatch.setattr(V, "_rows", lambda spec: (np.ones((1, 1)), np.zeros(1)))
    monkeypatch.setattr(B, "relu_bab", lambda *a, **k: tries.append(now[0]) or
                        types.SimpleNamespace(status="unknown", counterexample=None))

    def fake_refine(blocks, lower, upper, bl, bu, *, stop, **kw):
        for t in range(101):
            now[0] = float(t)
            assert not stop(lower, upper)
        return lower, upper, SplitRefineInfo()
    monkeypatch.setattr(split_refine, "split_refine_bounds", fake_refine)

    class _Bounds:
        lower, upper = [np.zeros(1)], [np.zeros(1)]

        def copy(self):
            return _Bounds()

    new, decided = V._split_refine([], _Bounds(), types.SimpleNamespace(lower=None, upper=None), None,
                                   np.array([0, 1]), V._Clock(None), "cpu", [], network=object(),
                                   result=lambda *a: None)
    assert decided is None and new.method == "split-refined"
    assert tries == [0.0, 10.0, 30.0, 70.0]
