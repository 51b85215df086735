"""Torch bound engine (crown.py): sound on sampled inputs, as tight as the numpy CROWN reference at
init, α/β optimization never loosens and stays below sampled minima (also on split domains)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mipprune.verification import crown
from mipprune.verification.bounds import compute_bounds, linear_lower_bound
from solvers.errors import InvalidInputError, SolverNotAvailableError
from tests.mipprune.verification.test_bounds import preactivations, random_net, sample_region


def _t(net, a):
    return net.tensor(a)[None, :]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.floats(0.05, 1.5), depth=st.integers(1, 4))
def test_intermediate_bounds_are_sound_and_as_tight_as_numpy_crown(seed, width, depth):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [4] + [7] * depth + [3])
    c = rng.normal(size=4)
    lo, hi = c - width, c + width
    ref = compute_bounds(net, lo, hi, "crown")
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    L, U = crown.crown_intermediate(tn, _t(tn, lo), _t(tn, hi))
    FL, FU = crown.forward_bounds(tn, _t(tn, lo), _t(tn, hi))
    pre = preactivations(net, sample_region(rng, lo, hi, 500))
    for i, z in enumerate(pre):
        l, u = L[i][0].numpy(), U[i][0].numpy()
        assert np.all(z >= l - 1e-9) and np.all(z <= u + 1e-9)
        assert np.all(z >= FL[i][0].numpy() - 1e-9) and np.all(z <= FU[i][0].numpy() + 1e-9)
        # same relaxation as the reference; only the round-off margin (1e-9 relative per layer) differs
        tol = 1e-6 * (1 + np.abs(ref.lower[i]).max() + np.abs(ref.upper[i]).max())
        assert np.all(l >= ref.lower[i] - tol) and np.all(u <= ref.upper[i] + tol)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.floats(0.05, 1.0))
def test_output_bound_matches_numpy_at_init_and_alpha_only_tightens(seed, width):
    rng = np.random.default_rng(seed)
    net = random_net(rng, [4, 8, 8, 8, 3])
    c = rng.normal(size=4)
    lo, hi = c - width, c + width
    b = compute_bounds(net, lo, hi, "crown")
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]])
    ref = linear_lower_bound(net, b, C, lower=lo, upper=hi)
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    lower = [_t(tn, a) for a in b.lower[:-1]]
    upper = [_t(tn, a) for a in b.upper[:-1]]
    Ct, c0 = tn.tensor(C)[None], torch.zeros(1, 3, dtype=tn.dtype)
    lb0, X, _ = crown.backward_bound(tn, lower, upper, Ct, c0, _t(tn, lo), _t(tn, hi))
    # the reference also takes the max with interval reasoning on the output bounds
    ibp = np.maximum(C, 0) @ b.lower[-1] + np.minimum(C, 0) @ b.upper[-1]
    assert np.all(np.maximum(lb0[0].numpy(), ibp) >= ref - 1e-9 * (1 + np.abs(ref)))
    lb, Xa, _, _ = crown.optimize_bound(tn, lower, upper, Ct, c0, _t(tn, lo), _t(tn, hi), iters=15)
    assert np.all(lb[0].numpy() >= lb0[0].numpy() - 1e-12)
    Y = net.forward(sample_region(rng, lo, hi, 3000)) @ C.T
    assert np.all(lb[0].numpy() <= Y.min(axis=0) + 1e-9)
    # the minimizers lie in the box
    assert np.all(Xa[0].numpy() >= lo - 1e-12) and np.all(Xa[0].numpy() <= hi + 1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), layer=st.integers(0, 1))
def test_beta_bounds_are_sound_on_split_domains(seed, layer):
    """Split one unstable neuron each way; the α/β bound must stay below every sample of that side."""
    rng = np.random.default_rng(seed)
    net = random_net(rng, [3, 6, 6, 2])
    lo, hi = -np.ones(3), np.ones(3)
    b = compute_bounds(net, lo, hi, "crown")
    unstable = np.flatnonzero(b.unstable(layer))
    if unstable.size == 0:
        return
    k = int(unstable[0])
    tn = crown.TorchNet.from_blocks(net.to_affine_relu())
    X = sample_region(rng, lo, hi, 4000)
    z = preactivations(net, X)[layer][:, k]
    y = net.forward(X)[:, 0] - net.forward(X)[:, 1]
    for sign in (1, -1):
        side = z >= 0 if sign > 0 else z <= 0
        splits = {j: torch.zeros(1, b.lower[j].size, dtype=tn.dtype) for j in range(2)}
        splits[layer][0, k] = sign
        lower, upper = [], []
        for j in range(2):
            l, u = crown.apply_splits(_t(tn, b.lower[j]), _t(tn, b.upper[j]), splits[j])
            lower.append(l)
            upper.append(u)
        C = tn.tensor([[1.0, -1.0]])[None]
        lb, _, _, _ = crown.optimize_bound(tn, lower, upper, C, torch.zeros(1, 1, dtype=tn.dtype), _t(tn, lo),
                                           _t(tn, hi), splits=splits, iters=30)
        if side.any():
            assert float(lb[0, 0]) <= y[side].min() + 1e-9


def test_round_off_sized_bounds_are_not_proven_and_devices_are_checked():
    lb = torch.tensor([1e-13, -1.0, 1e-3], dtype=torch.float64)
    assert crown.proven(lb).tolist() == [False, False, True]
    assert not bool(crown.proven(torch.tensor([1e-6], dtype=torch.float32)))   # float32 needs a wider margin
    with pytest.raises(InvalidInputError, match="device must be"):
        crown.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SolverNotAvailableError, match="CUDA"):
            crown.resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_bounds_agree_with_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    rng = np.random.default_rng(0)
    net = random_net(rng, [4, 16, 16, 3])
    lo, hi = -np.ones(4) * 0.3, np.ones(4) * 0.3
    cpu = crown.TorchNet.from_blocks(net.to_affine_relu(), "cpu")
    gpu = crown.TorchNet.from_blocks(net.to_affine_relu(), "cuda")
    Lc, Uc = crown.crown_intermediate(cpu, _t(cpu, lo), _t(cpu, hi))
    Lg, Ug = crown.crown_intermediate(gpu, _t(gpu, lo), _t(gpu, hi))
    for a, b in zip(Lg, Lc):   # float32 + margin: never tighter than float64 by more than round-off
        assert np.all(a.cpu().double().numpy() <= b.numpy() + 1e-5)


def test_a_float32_box_contains_the_float64_box():
    rng = np.random.default_rng(0)
    net = crown.TorchNet.from_blocks(random_net(rng, [5, 4, 2]).to_affine_relu(), "cpu", dtype=torch.float32)
    lo, hi = rng.uniform(-1, 0, 5) + 1e-9, rng.uniform(0, 1, 5) - 1e-9
    l, u = net.box(lo, hi)
    assert l.dtype == torch.float32
    assert np.all(l[0].double().numpy() <= lo) and np.all(u[0].double().numpy() >= hi)


def _conv_net(rng):
    """1×12×12 → conv 4×3×3 (pad 1) → ReLU → conv 4×3×3 (stride 2, pad 1) → ReLU → dense 3: both conv
    matrices (576×144, 144×576, ~6 % dense) take the sparse products."""
    from solvers.network.ir import Network
    from solvers.network.layers import Conv2d, Dense, Flatten, ReLU

    w = lambda *s: rng.normal(size=s) / np.sqrt(np.prod(s[1:]))  # noqa: E731
    return Network([Conv2d(w(4, 1, 3, 3), 0.2 * rng.normal(size=4), padding=1), ReLU(),
                    Conv2d(w(4, 4, 3, 3), 0.2 * rng.normal(size=4), stride=2, padding=1), ReLU(), Flatten(),
                    Dense(w(3, 144), 0.2 * rng.normal(size=3))], (1, 12, 12))


def _without_conv_hints(blocks):
    return [dataclasses.replace(b, conv=None) for b in blocks]


def test_conv_and_sparse_products_give_the_dense_bounds_and_gradients(monkeypatch):
    """The same bounds, α gradients, optimized bounds and forward pass from the convolutions' own products
    (``conv2d`` / ``conv_transpose2d``, here in float64 to compare at 1e-9), their CSR matrices and dense
    matrices. The convolutions are opt-in (``conv=True``) and only in float32 (the searches' steps)."""
    rng = np.random.default_rng(3)
    blocks = _conv_net(rng).to_affine_relu()
    kinds = lambda net: [type(row[0]).__name__ for row in net.sparse]  # noqa: E731
    csr, conv = ["_SparseTerm", "_SparseTerm", "NoneType"], ["_ConvTerm", "_ConvTerm", "NoneType"]
    default = crown.TorchNet.from_blocks(blocks)
    assert kinds(default) == csr and kinds(default.to_dtype(torch.float32)) == csr
    assert kinds(crown.TorchNet.from_blocks(blocks, conv=True)) == csr          # float64 keeps CSR
    assert kinds(default.to_dtype(torch.float32, conv=True)) == conv
    assert kinds(default.to_dtype(torch.float32, conv=True).to_dtype(torch.float64)) == csr
    monkeypatch.setattr(crown, "CONV_DTYPE", torch.float64)
    cv = crown.TorchNet.from_blocks(blocks, conv=True)
    assert [type(row[0]).__name__ for row in cv.sparse] == ["_ConvTerm", "_ConvTerm", "NoneType"]
    sp = crown.TorchNet.from_blocks(_without_conv_hints(blocks))
    assert [type(row[0]).__name__ for row in sp.sparse] == ["_SparseTerm", "_SparseTerm", "NoneType"]
    monkeypatch.setattr(crown, "SPARSE_MIN_SIZE", 1 << 40)
    dn = crown.TorchNet.from_blocks(blocks)
    assert all(s is None for row in dn.sparse for s in row)
    c = rng.uniform(-1, 1, size=144)
    lo, hi = _t(sp, c - 0.05), _t(sp, c + 0.05)
    C = sp.tensor(rng.normal(size=(2, 3)))[None]
    c0 = torch.zeros(1, 2, dtype=torch.float64)
    res = []
    for tn in (cv, sp, dn):
        lower, upper = crown.crown_intermediate(tn, lo, hi)
        lb0 = crown.backward_bound(tn, lower[:-1], upper[:-1], C, c0, lo, hi)[0]
        alphas = {j: crown.relaxation(lower[j], upper[j])[0][:, None, :].expand(1, 2, -1).clone().requires_grad_(True)
                  for j in range(2)}
        lb = crown.backward_bound(tn, lower[:-1], upper[:-1], C, c0, lo, hi, alphas=alphas)[0]
        lb.sum().backward()
        lbo = crown.optimize_bound(tn, lower[:-1], upper[:-1], C, c0, lo, hi, iters=5)[0]
        res.append((lower, upper, lb0, [alphas[j].grad for j in range(2)], lbo, tn.forward(lo)))
    (l1, u1, b1, g1, o1, f1) = res[0]
    for other in res[1:]:
        (l2, u2, b2, g2, o2, f2) = other
        for a, b in zip(l1 + u1 + [b1, o1, f1] + g1, l2 + u2 + [b2, o2, f2] + g2):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    # and sound: the optimized bound stays below sampled margins
    X = torch.as_tensor(rng.uniform(c - 0.05, c + 0.05, size=(400, 144)))
    assert bool((o1[0][None] <= (sp.forward(X) @ C[0].T) + 1e-9).all())
    assert sp.to_dtype(torch.float32).sparse[0][0].W.dtype == torch.float32


def test_a_conv_hint_that_does_not_match_its_matrix_is_not_used():
    """The IR's convolution geometry is only a hint: a block whose matrix was changed after the fact (here its
    kernel's first weight), or whose shapes do not fit, keeps the sparse product of the matrix itself."""
    rng = np.random.default_rng(4)
    blocks = _conv_net(rng).to_affine_relu()
    g = blocks[0].conv
    stale = dataclasses.replace(g, kernel=g.kernel + np.eye(1, g.kernel.size).reshape(g.kernel.shape))
    wrong_shape = dataclasses.replace(g, in_shape=(1, 11, 13))
    for hint in (stale, wrong_shape):
        net = crown.TorchNet.from_blocks([dataclasses.replace(blocks[0], conv=hint)] + blocks[1:], dtype=torch.float32,
                                         conv=True)
        assert type(net.sparse[0][0]).__name__ == "_SparseTerm"
        assert type(net.to_dtype(torch.float64).to_dtype(torch.float32, conv=True).sparse[0][0]).__name__ == "_SparseTerm"
    # and a sound one passes the same check in float32 (the optimizer's steps)
    net = crown.TorchNet.from_blocks(blocks).to_dtype(torch.float32, conv=True)
    assert type(net.sparse[0][0]).__name__ == "_ConvTerm"
    x = torch.as_tensor(rng.normal(size=(5, 144)), dtype=torch.float32)
    want = torch.as_tensor(blocks[0].weight @ x.double().numpy().T).T
    assert torch.allclose(net.sparse[0][0].fwd(x).double(), want, atol=1e-5)


def test_adam_rows_warmed_with_earlier_moments_step_on_from_them():
    """``_Ascent.warm``: rows that start from earlier (bias-corrected) moments take Adam's step from them with no
    bias correction, the other rows take a fresh Adam's first step (``lr·sign(g)``), and ``moments`` hands back
    the bias-corrected moments in the form ``warm`` takes."""
    p = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    opt = crown._Ascent([{"params": [p], "lr": 0.1}])
    m0 = torch.tensor([[0.5, -0.2, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    v0 = torch.tensor([[1.0, 0.04, 0.01], [9.0, 9.0, 9.0]], dtype=torch.float64)
    opt.warm(0, 0, m0, v0, torch.tensor([True, False]))
    g = torch.tensor([[0.3, 0.1, -0.5], [0.3, 0.1, -0.5]], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    m1, v1 = 0.9 * m0[0] + 0.1 * g[0], 0.999 * v0[0] + 0.001 * g[0] ** 2
    assert torch.allclose(p[0].detach(), 0.1 * m1 / (v1.sqrt() + 1e-8))
    assert torch.allclose(p[1].detach(), 0.1 * g[1].sign(), atol=1e-7)
    m, v = opt.moments(0, 0)
    assert torch.allclose(m[0], m1) and torch.allclose(v[0], v1)
    assert torch.allclose(m[1], g[1]) and torch.allclose(v[1], g[1] ** 2)    # one step, bias-corrected
