"""The bound engine and both branch-and-bound searches on CUDA (float32 with the round-off margin):
the same verdicts as brute force and as the float64 CPU run, every counterexample re-checked in
float64, the path taken recorded with its device. Opt-in: ``--run-gpu``."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import mipprune
from mipprune.verification.bab import input_bab, relu_bab
from mipprune.verification.bounds import compute_bounds
from solvers.network.spec import Spec
from solvers.result import Verdict
from tests.mipprune.verification.test_bab import CASES, brute_force_case, control_network
from tests.mipprune.verification.test_residual_pooling import E2E, _robustness, conv_res_pool_net, e2e_case

# MIPPRUNE_TEST_DEVICE=cpu runs this file on the CPU (a dry run of the GPU tests on a machine without one)
DEVICE = os.environ.get("MIPPRUNE_TEST_DEVICE", "cuda")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("seed,eps", CASES)
def test_relu_and_input_bab_on_the_device_agree_with_brute_force(seed, eps):
    net, spec, truth, blocks, b, disj = brute_force_case(seed, eps)
    for r in (relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 30, device=DEVICE),
              input_bab(net, spec, blocks, disj, deadline=time.perf_counter() + 30, device=DEVICE)):
        if truth > 0:
            assert r.status == "verified", r.message
        else:
            assert r.status == "falsified", r.message
            assert spec.is_counterexample(net, r.counterexample)


@pytest.mark.parametrize("precision", ["auto", "float64"])   # float64: a proof on the GPU, like the CPU's
@pytest.mark.parametrize("name,seed,eps,expected", E2E)
def test_verify_on_the_device_decides_residual_and_pooling_networks_like_the_milp(name, seed, eps, expected,
                                                                                  precision):
    net, spec = e2e_case(name, seed, eps)
    for path in ["bab"] + (["input"] if net.n_inputs <= 16 else []):
        r = mipprune.verify(net, spec, time_limit=30, complete=path, bounds_method="crown", attack=False,
                            device=DEVICE, precision=precision)
        assert r.verdict == expected, (path, r.message)
        if r.stage in ("bab", "input"):
            assert f"on {DEVICE}" in r.message, r.message
        if expected == Verdict.FALSIFIED:
            assert spec.is_counterexample(net, r.counterexample)


def test_relu_bab_on_the_device_splits_a_pooling_net():
    rng = np.random.default_rng(0)
    net = conv_res_pool_net(rng)
    spec = _robustness(net, rng.uniform(-1, 1, size=net.n_inputs), 0.2)
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    r = relu_bab(net, spec, net.to_affine_relu(), b.lower, b.upper, list(range(len(spec.disjuncts))),
                 deadline=time.perf_counter() + 30, root_iters=0, device=DEVICE)
    assert r.status == "verified" and r.domains > 1 and r.info["root_open"] > 0, r.message


def test_the_small_input_family_on_the_device():
    """Input splitting of the 5-input 6x50 control net on the device: falsified where a sampled point
    beats the threshold, never wrong elsewhere."""
    net = control_network(0)
    rng = np.random.default_rng(1)
    c = rng.uniform(-0.5, 0.5, 5)
    lo, hi = c - 0.1, c + 0.1
    ys = net.forward(rng.uniform(lo, hi, (4000, 5)))[:, 0]
    for thr, sat in ((ys.max() + 0.1, False), (ys.max() - 1e-3, True)):
        spec = Spec(lo, hi, ((np.array([[-1.0]]), np.array([-thr])),))
        r = mipprune.verify(net, spec, time_limit=20, complete="input", device=DEVICE)
        if sat:
            assert r.verdict is Verdict.FALSIFIED and spec.is_counterexample(net, r.counterexample)
        else:
            assert r.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED), r.message
            if r.verdict is Verdict.FALSIFIED:
                assert spec.is_counterexample(net, r.counterexample)


@pytest.mark.parametrize("seed,eps", [(0, 0.25), (2, 0.25), (5, 0.4)])
def test_branch_and_bound_with_scip_root_cuts_on_the_device_decides_like_on_the_cpu(seed, eps):
    """The cut-aware bound (GCP-CROWN multipliers, children's cut states with their Adam moments) on the
    device: the same verdict as the CPU's float64 search with the same cuts, a counterexample re-checked."""
    pytest.importorskip("pyscipopt")
    from tests.mipprune.verification.test_cuts import _cut_search_case

    net, spec, blocks, b, rc, disj = _cut_search_case(seed, eps)
    runs = [relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60, cuts=rc,
                     device=device) for device in ("cpu", DEVICE)]
    assert runs[0].status == runs[1].status and runs[1].status in ("verified", "falsified"), runs[1].message
    if runs[1].status == "falsified":
        assert spec.is_counterexample(net, runs[1].counterexample)
    elif runs[1].domains > 1:   # the cuts entered the device's root bound as they did the CPU's
        assert runs[1].info["root_lb"] >= runs[1].info["root_lb_without_cuts"] - 1e-6


def test_convolutions_on_the_device_use_their_own_products_in_full_float32():
    """With ``conv=True`` a conv block's products run as conv2d / conv_transpose2d on the device (cuDNN's TF32, on by default,
    would fail the term's check against the matrix and fall back to CSR) and give the CPU's float64 bounds to
    float32 round-off."""
    from mipprune.verification import crown
    from tests.mipprune.verification.test_crown import _conv_net

    rng = np.random.default_rng(3)
    blocks = _conv_net(rng).to_affine_relu()
    dev = crown.TorchNet.from_blocks(blocks, DEVICE, dtype=torch.float32, conv=True)
    assert [type(row[0]).__name__ for row in dev.sparse] == ["_ConvTerm", "_ConvTerm", "NoneType"]
    cpu = crown.TorchNet.from_blocks(blocks)
    c = rng.uniform(-1, 1, size=144)
    bounds = []
    for tn in (dev, cpu):
        lo, hi = tn.tensor(c - 0.05)[None], tn.tensor(c + 0.05)[None]
        lower, upper = crown.crown_intermediate(tn, lo, hi)
        bounds.append([torch.cat([x.double().cpu().flatten() for x in xs]) for xs in (lower, upper)])
    (l32, u32), (l64, u64) = bounds
    # float32's bounds contain float64's (loosened by its 1e-4 slack) and stay within that slack of them
    assert bool((l32 <= l64 + 1e-9).all() and (u32 >= u64 - 1e-9).all())
    assert torch.allclose(l32, l64, rtol=1e-3, atol=1e-3) and torch.allclose(u32, u64, rtol=1e-3, atol=1e-3)
