"""Cutting planes inside bound propagation (GCP-CROWN, Zhang et al. 2022), on :mod:`.crown`'s nets.

A cut is a linear inequality over the MILP's variables that every point of the network satisfies:

    Σ_x a·x + Σ_j (Z_j·z_j + H_j·h_{j+1} + Q_j·δ_j) <= d

with ``z_j`` the pre-activations of block ``j``, ``h_{j+1} = ReLU(z_j)`` and ``δ_j`` the ReLU
indicators (``δ = 1`` where the neuron is active; fixed on stable and split neurons). Cuts enter the
back-substitution by Lagrange multipliers ``μ >= 0`` (one per cut and bound row): ``min f >= min f +
μ·(lhs − d)``. The ReLU of an unstable neuron is then relaxed with its indicator kept (``h >= 0,
h >= z, h <= u·δ, h <= z − l·(1 − δ), δ ∈ [0, 1]``): with coefficient ``ν`` on ``h`` and ``q`` on ``δ``
and multipliers ``π₁, π₂ >= 0`` of the two upper constraints (``ν + π₁ + π₂ >= 0``),

    ν·h + q·δ >= ((ν + π₁ + π₂)·α − π₂)·z + π₂·l + min(0, q − π₁·u − π₂·l),   α ∈ [0, 1],

sound for every such ``π`` and ``α``; with ``q = 0`` the best ``π`` gives CROWN's triangle. Here
``π₁ + π₂ = max(0, −ν) + σ`` (``σ >= 0``) and ``π₂ = τ·(π₁ + π₂)`` (``τ ∈ [0, 1]``, CROWN's ``u/(u − l)`` at
the start), and ``α, τ, σ, μ`` are optimized by projected gradient ascent like α-CROWN's slopes:
every iterate is a sound bound, the best is kept.

Fully connected and convolutional ReLU blocks with residual skips; max-pool blocks are refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mipprune.verification import crown
from mipprune.verification.crown import TorchNet
from solvers.errors import InvalidInputError

__all__ = ["Cuts", "cuts_from_columns", "cut_bound", "optimize_cut_bound"]


@dataclass
class Cuts:
    """``K`` cuts ``x·X + Σ_j (z_j·Z[j] + h_{j+1}·H[j] + δ_j·Q[j]) <= d``: ``X`` (K, n_0); ``Z``, ``H``,
    ``Q``: block → (K, n_j) (missing blocks: zero); ``d`` (K,). Solver cuts touch a few dozen columns
    each: the products with the multipliers run on sparse copies (:meth:`times`)."""

    X: torch.Tensor
    Z: dict
    H: dict
    Q: dict
    d: torch.Tensor

    def __post_init__(self):
        # per block the neurons whose indicator some cut uses: only they need the indicator relaxation (with
        # no δ term the best choice of π is CROWN's triangle)
        self.q_idx = {j: torch.nonzero((M != 0).any(0))[:, 0] for j, M in self.Q.items()}
        self._sparse = {}
        for kind, mats in (("X", {0: self.X}), ("Z", self.Z), ("H", self.H), ("Q", self.Q)):
            for j, M in mats.items():
                self._sparse[kind, j] = _sparse_pair(M) if bool((M != 0).any()) else None

    @property
    def K(self) -> int:
        return int(self.d.numel())

    def to(self, dtype: torch.dtype) -> "Cuts":
        """A copy in ``dtype`` (float32 steps whose bound is then evaluated with the float64 cuts)."""
        f = lambda t: t.to(dtype)  # noqa: E731
        return Cuts(f(self.X), {j: f(t) for j, t in self.Z.items()}, {j: f(t) for j, t in self.H.items()},
                    {j: f(t) for j, t in self.Q.items()}, f(self.d))

    def has(self, kind: str, j: int) -> bool:
        return self._sparse.get((kind, j)) is not None

    def times(self, mu: torch.Tensor, kind: str, j: int = 0) -> torch.Tensor:
        """``mu @ M`` for ``mu`` (…, K) and the cut matrix ``M`` of ``kind`` ("X", "Z", "H", "Q") and block ``j``."""
        MT, M = self._sparse[kind, j]
        return crown._SparseRight.apply(mu, MT, M)

    def violation(self, x: torch.Tensor, zs: list) -> torch.Tensor:
        """``lhs − d`` (N, K) at inputs ``x`` (N, n_0) with pre-activations ``zs[j]`` (N, n_j): > 0 is
        a violated cut (for tests: a valid cut is never violated by the network's own points)."""
        lhs = x @ self.X.T - self.d
        for j, z in enumerate(zs):
            if j in self.Z:
                lhs = lhs + z @ self.Z[j].T
            if j in self.H:
                lhs = lhs + torch.relu(z) @ self.H[j].T
            if j in self.Q:
                lhs = lhs + (z > 0).to(z.dtype) @ self.Q[j].T
        return lhs


def _sparse_pair(M: torch.Tensor):
    """``(Mᵀ, M)`` as torch sparse CSR (for :class:`crown._SparseRight`: ``x @ M`` and its gradient)."""
    import scipy.sparse as sp

    A = sp.csr_matrix(M.detach().cpu().numpy())
    return crown._csr(A.T, M.dtype, M.device), crown._csr(A, M.dtype, M.device)


def cuts_from_columns(model, coef, d, net: TorchNet) -> Cuts:
    """Cuts ``coef @ v <= d`` over the columns ``v`` of a :func:`solvers.milp.build_milp` model
    (``coef`` (K, n_vars) dense or scipy.sparse, ``d`` (K,)) as :class:`Cuts` on ``net``'s blocks; a cut
    on any other column (an L1 region's helpers, max-pool binaries) is refused."""
    import numpy as np
    import scipy.sparse as sp

    coef = sp.csr_matrix(coef).toarray() if sp.issparse(coef) else np.atleast_2d(np.asarray(coef, dtype=np.float64))
    K = coef.shape[0]
    used = np.zeros(coef.shape[1], bool)
    used[model.x_cols] = True
    X = net.tensor(coef[:, model.x_cols])
    Z, H, Q = {}, {}, {}
    for j, (h_col, d_col) in enumerate(zip(model.unit_cols, model.binary_cols)):
        n = h_col.size
        zj, hj, qj = (np.zeros((K, n)) for _ in range(3))
        alive, unstable = h_col >= 0, d_col >= 0
        hj[:, alive] = coef[:, h_col[alive]]
        qj[:, unstable] = coef[:, d_col[unstable]]
        z_col = model.info["z_cols"][j]
        if z_col.size:
            zj[:, unstable] = coef[:, z_col]
            used[z_col] = True
        used[h_col[alive]] = used[d_col[unstable]] = True
        Z[j], H[j], Q[j] = net.tensor(zj), net.tensor(hj), net.tensor(qj)
    if np.any(coef[:, ~used] != 0):
        raise InvalidInputError("a cut uses MILP columns outside the network's inputs, pre-activations, "
                                "activations and ReLU indicators (an L1 region or a max pool)")
    return Cuts(X, Z, H, Q, net.tensor(np.asarray(d, dtype=np.float64).reshape(K)))


def _indicator_relax(nu, q, l, u, alpha, tau, sigma):
    """Back through ReLUs with indicator coefficients: ``nu`` (D, m, n) on ``h``, ``q`` (D, m, n) on ``δ``,
    bounds ``l, u`` (D, n); returns ``Lz`` (D, m, n) and the constant (D, m)."""
    l, u = l[:, None, :], u[:, None, :]
    active, unstable = l >= 0, (l < 0) & (u > 0)
    rho = nu.clamp(max=0).neg() + sigma.clamp(min=0)
    t = tau.clamp(0, 1)
    p2, p1 = rho * t, rho * (1 - t)
    lz_un = (nu + rho) * alpha.clamp(0, 1) - p2
    c_un = p2 * l + torch.clamp(q - p1 * u - p2 * l, max=0)
    Lz = torch.where(unstable, lz_un, torch.where(active, nu, torch.zeros_like(nu)))
    const = torch.where(unstable, c_un, torch.where(active, q, torch.zeros_like(q))).sum(-1)
    return Lz, const


def _relax_block(nu, q, l, u, relax, alpha, idx, tau, sigma):
    """Back through ReLU block ``j``: CROWN's relaxation (lower slopes ``alpha`` on unstable neurons), and the
    indicator relaxation on the neurons ``idx`` whose indicator a cut uses (``q`` (D, m, n) their coefficients,
    ``tau``, ``sigma`` (D, m, |idx|))."""
    a, s, t, unstable = relax
    al = torch.where(unstable[:, None, :], alpha.clamp(0, 1), a[:, None, :]) if alpha is not None else a[:, None, :]
    pos, neg = nu.clamp(min=0), nu.clamp(max=0)
    Lz, const = pos * al + neg * s[:, None, :], (neg * t[:, None, :]).sum(-1)
    if idx is None or not idx.numel():
        return Lz, const
    lz_i, c_i = _indicator_relax(nu[..., idx], q[..., idx], l[:, idx], u[:, idx], al[..., idx], tau, sigma)
    const = const - (neg[..., idx] * t[:, None, idx]).sum(-1) + c_i
    return Lz.index_copy(2, idx, lz_i), const


def cut_bound(net: TorchNet, lower, upper, C, c0, lo, hi, cuts: Cuts, mu, alphas: dict, taus: dict, sigmas: dict,
              *, betas: dict | None = None, splits: dict | None = None, relax: dict | None = None):
    """Lower bound of ``C z_L + c0`` (D, m) with ``cuts`` weighted by ``mu`` (D, m, K) >= 0; ``alphas``: ReLU
    block → (D, m, n_j) lower slopes; ``taus``, ``sigmas``: block → (D, m, |cuts.q_idx[j]|), the indicator
    relaxation's parameters on the neurons whose indicator a cut uses (see the module docstring);
    ``lower[j], upper[j]`` (D, n_j) with any splits applied, ``betas``/``splits`` as in
    :func:`crown.backward_bound`; ``relax``: block → :func:`crown.relaxation` of its bounds (precomputed).
    Returns ``(lb (D, m), argmin (D, m, n_0))``."""
    if any(p is not None for p in net.pool[:-1]):
        raise InvalidInputError("cutting planes in the bound support ReLU blocks only; this network has a max pool")
    L = net.n_layers - 1
    mu = mu.clamp(min=0)
    Lh: dict = {}
    Lz, const = C, c0 - mu @ cuts.d
    for i in range(L, -1, -1):
        const = const + Lz @ net.b[i]
        for t, (k, W) in enumerate(net.terms(i)):
            contrib = net.back(i, t, W, Lz)
            Lh[k] = Lh[k] + contrib if k in Lh else contrib
        if i == 0:
            break
        j = i - 1
        nu = Lh.pop(i, None)
        if nu is None:
            nu = torch.zeros(Lz.shape[:2] + (net.W[i].shape[1],), dtype=Lz.dtype, device=Lz.device)
        if cuts.has("H", j):
            nu = nu + cuts.times(mu, "H", j)
        q = cuts.times(mu, "Q", j) if cuts.has("Q", j) else None
        rel = relax[j] if relax is not None else crown.relaxation(lower[j], upper[j])
        Lz, c = _relax_block(nu, q, lower[j], upper[j], rel, alphas.get(j), cuts.q_idx.get(j) if q is not None else None,
                             taus.get(j), sigmas.get(j))
        const = const + c
        if cuts.has("Z", j):
            Lz = Lz + cuts.times(mu, "Z", j)
        if betas is not None and j in betas:
            Lz = Lz - betas[j].clamp(min=0) * splits[j][:, None, :]
    Lam = Lh.pop(0)
    if cuts.has("X", 0):
        Lam = Lam + cuts.times(mu, "X")
    return crown.concretize(Lam, const, lo, hi)


def optimize_cut_bound(net: TorchNet, lower, upper, C, c0, lo, hi, cuts: Cuts, *, iters: int = 50,
                       lr: float = 0.05, lr_mu: float = 0.01, lr_beta: float = 0.05, alphas: dict | None = None,
                       betas: dict | None = None, splits: dict | None = None, mu: torch.Tensor | None = None,
                       deadline: float | None = None, out: dict | None = None, want_x: bool = False):
    """Best of ``iters`` Adam steps on ``α, τ, σ, μ`` (and ``β`` on split domains) of :func:`cut_bound`, from
    CROWN's relaxation or ``alphas`` (e.g. a parent's), ``betas`` (else 0), ``mu`` (D, m, K) (else 0: the first
    iterate is then the cut-free bound). Returns ``lb (D, m)``, or ``(lb, argmin (D, m, n_0))`` with
    ``want_x``; ``out`` receives the last iterate's ``"alphas"``, ``"betas"``, ``"taus"``, ``"sigmas"`` (block →
    (D, m, n_j)) and ``"mu_last"``, and the best bound's ``"mu"`` (D, m, K)."""
    D, m = c0.shape
    al, ta, si, be = {}, {}, {}, {}
    relax = {j: crown.relaxation(lower[j], upper[j]) for j in range(net.n_layers - 1)}
    for j in range(net.n_layers - 1):
        a, s, _, _ = relax[j]
        init = alphas[j] if alphas is not None and j in alphas else a[:, None, :].expand(D, m, -1)
        al[j] = init.detach().clone().requires_grad_(True)
        idx = cuts.q_idx.get(j)
        if idx is not None and idx.numel():
            ta[j] = s[:, None, idx].expand(D, m, -1).clone().requires_grad_(True)
            si[j] = torch.zeros(D, m, idx.numel(), dtype=net.dtype, device=net.device, requires_grad=True)
    for j, sj in (splits or {}).items():
        if bool((sj != 0).any()):
            init = betas[j] if betas is not None and j in betas else torch.zeros(D, m, sj.shape[1], dtype=net.dtype,
                                                                                 device=net.device)
            be[j] = init.detach().clone().requires_grad_(True)
    mu = (torch.zeros(D, m, cuts.K, dtype=net.dtype, device=net.device) if mu is None else
          mu.detach().clone()).requires_grad_(True)
    groups = [{"params": [*al.values(), *ta.values(), *si.values()], "lr": lr}, {"params": [mu], "lr": lr_mu}]
    if be:
        groups.append({"params": list(be.values()), "lr": lr_beta})
    opt = crown._Ascent(groups)
    best = best_mu = best_X = None
    for _ in range(max(1, iters)):
        if best is not None and deadline is not None and time.perf_counter() > deadline:
            break
        opt.zero_grad()
        lb, X = cut_bound(net, lower, upper, C, c0, lo, hi, cuts, mu, al, ta, si, betas=be or None,
                          splits=splits if be else None, relax=relax)
        with torch.no_grad():
            if best is None:
                best, best_mu, best_X = lb.detach().clone(), mu.detach().clamp(min=0).clone(), X
            else:
                better = lb > best
                best = torch.where(better, lb, best)
                best_mu = torch.where(better[..., None], mu.detach().clamp(min=0), best_mu)
                if want_x:
                    best_X = torch.where(better[..., None], X, best_X)
        if bool(crown.proven(best).all()):
            break
        lb.sum().backward()
        opt.step()
        with torch.no_grad():
            for p in [*al.values(), *ta.values()]:
                p.clamp_(0, 1)
            for p in [*si.values(), *be.values(), mu]:
                p.clamp_(min=0)
    if out is not None:
        out["alphas"] = {j: p.detach() for j, p in al.items()}
        out["betas"] = {j: p.detach() for j, p in be.items()}
        out["taus"] = {j: p.detach() for j, p in ta.items()}
        out["sigmas"] = {j: p.detach() for j, p in si.items()}
        out["mu"], out["mu_last"] = best_mu, mu.detach()
    return (best, best_X) if want_x else best
