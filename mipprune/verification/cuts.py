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

import numpy as np
import scipy.sparse as sp
import torch

from mipprune.verification import crown
from mipprune.verification.crown import TorchNet
from solvers.errors import InvalidInputError

__all__ = ["Cuts", "cuts_from_columns", "cut_bound", "optimize_cut_bound"]

# Adam's step on the cut multipliers μ. The LP optimum's cut duals are small (OVAL21 wide img3458: 564 of 941
# nonzero, all <= 0.046); steps of 0.01 oscillate around them: 50 steps reach -0.365 on img3458's root where 0.001
# reaches -0.321 (LP with the same cuts: -0.305), img1052 -0.0764 against -0.0709 (SCIP's root: -0.0667).
LR_MU = 0.001


@dataclass
class Cuts:
    """``K`` cuts ``x·X + Σ_j (z_j·Z[j] + h_{j+1}·H[j] + δ_j·Q[j]) <= d``: ``X`` (K, n_0); ``Z``, ``H``,
    ``Q``: block → (K, n_j) (missing blocks: zero), each a scipy.sparse matrix or a dense tensor; ``d`` (K,)
    a tensor whose dtype and device the products take. Solver cuts touch a few dozen columns each: the
    products with the multipliers run on sparse CSR copies (:meth:`times`), nothing dense is kept."""

    X: object
    Z: dict
    H: dict
    Q: dict
    d: torch.Tensor

    def __post_init__(self):
        # per block the neurons whose indicator some cut uses: only they need the indicator relaxation (with
        # no δ term the best choice of π is CROWN's triangle)
        self.q_idx = {j: torch.as_tensor(np.unique(_scipy(M).tocoo().col), dtype=torch.long, device=self.d.device)
                      for j, M in self.Q.items()}
        self._sparse = {}
        for kind, mats in (("X", {0: self.X}), ("Z", self.Z), ("H", self.H), ("Q", self.Q)):
            for j, M in mats.items():
                A = _scipy(M)
                self._sparse[kind, j] = None if A.nnz == 0 else (
                    crown._csr(A.T, self.d.dtype, self.d.device), crown._csr(A, self.d.dtype, self.d.device))

    @property
    def K(self) -> int:
        return int(self.d.numel())

    def to(self, dtype: torch.dtype) -> "Cuts":
        """A copy in ``dtype`` (float32 steps whose bound is then evaluated with the float64 cuts)."""
        return Cuts(self.X, self.Z, self.H, self.Q, self.d.to(dtype))

    def extends(self, other: "Cuts") -> bool:
        """Whether this set's first ``other.K`` cuts are ``other``'s, in order (a union grown by appending: the
        multipliers of ``other``'s cuts carry over)."""
        K = other.K
        if self.K < K or not torch.equal(self.d[:K].cpu(), other.d.to(self.d.dtype).cpu()):
            return False
        for mine, theirs in (({0: self.X}, {0: other.X}), (self.Z, other.Z), (self.H, other.H), (self.Q, other.Q)):
            for j in set(mine) | set(theirs):
                a = _scipy(mine[j])[:K] if j in mine else None
                b = _scipy(theirs[j]) if j in theirs else None
                if a is None or b is None:   # a block only one side has: no cut of ``other`` may use it
                    if (a if a is not None else b).nnz:
                        return False
                elif a.shape != b.shape or (a != b).nnz:
                    return False
        return True

    def has(self, kind: str, j: int) -> bool:
        return self._sparse.get((kind, j)) is not None

    def times(self, mu: torch.Tensor, kind: str, j: int = 0) -> torch.Tensor:
        """``mu @ M`` for ``mu`` (…, K) and the cut matrix ``M`` of ``kind`` ("X", "Z", "H", "Q") and block ``j``."""
        MT, M = self._sparse[kind, j]
        return crown._SparseRight.apply(mu, MT, M)

    def violation(self, x: torch.Tensor, zs: list) -> torch.Tensor:
        """``lhs − d`` (N, K) at inputs ``x`` (N, n_0) with pre-activations ``zs[j]`` (N, n_j): > 0 is
        a violated cut (for tests: a valid cut is never violated by the network's own points)."""
        z64 = [np.asarray(z, dtype=np.float64) for z in zs]
        lhs = _scipy(self.X) @ np.asarray(x, dtype=np.float64).T - self.d.cpu().numpy()[:, None]
        for j, z in enumerate(z64):
            for mats, val in ((self.Z, z), (self.H, np.maximum(z, 0)), (self.Q, (z > 0).astype(np.float64))):
                if j in mats:
                    lhs = lhs + _scipy(mats[j]) @ val.T
        return torch.as_tensor(lhs.T)


def _scipy(M) -> sp.csr_matrix:
    return sp.csr_matrix(M.detach().cpu().numpy() if isinstance(M, torch.Tensor) else M)


def cuts_from_columns(model, coef, d, net: TorchNet) -> Cuts:
    """Cuts ``coef @ v <= d`` over the columns ``v`` of a :func:`solvers.milp.build_milp` model
    (``coef`` (K, n_vars) dense or scipy.sparse, ``d`` (K,)) as :class:`Cuts` on ``net``'s blocks (sparse,
    in ``net``'s dtype and device); a cut on any other column (an L1 region's helpers, max-pool binaries) is
    refused."""
    coef = sp.coo_matrix(coef if sp.issparse(coef) else np.atleast_2d(np.asarray(coef, dtype=np.float64)))
    K, n_vars = coef.shape
    # every column's place: kind (0 input, 1 pre-activation, 2 activation, 3 indicator), block, neuron
    kind, block, neuron = np.full(n_vars, -1), np.zeros(n_vars, int), np.zeros(n_vars, int)
    kind[model.x_cols], neuron[model.x_cols] = 0, np.arange(model.x_cols.size)
    widths = []
    for j, (h_col, d_col) in enumerate(zip(model.unit_cols, model.binary_cols)):
        widths.append(h_col.size)
        alive, unstable = np.flatnonzero(h_col >= 0), np.flatnonzero(d_col >= 0)
        for k, cols, at in ((2, h_col[alive], alive), (3, d_col[unstable], unstable),
                            (1, model.info["z_cols"][j], unstable)):
            if cols.size:
                kind[cols], block[cols], neuron[cols] = k, j, at
    if np.any(kind[coef.col] < 0):
        raise InvalidInputError("a cut uses MILP columns outside the network's inputs, pre-activations, "
                                "activations and ReLU indicators (an L1 region or a max pool)")

    def part(k, j, n):
        sel = (kind[coef.col] == k) & (block[coef.col] == j)
        return sp.csr_matrix((coef.data[sel], (coef.row[sel], neuron[coef.col[sel]])), shape=(K, n))

    X = part(0, 0, model.x_cols.size)
    Z = {j: part(1, j, n) for j, n in enumerate(widths)}
    H = {j: part(2, j, n) for j, n in enumerate(widths)}
    Q = {j: part(3, j, n) for j, n in enumerate(widths)}
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
    # crown.backward_bound's walk (its block step shared), with the cut terms added at each block
    Lh: dict = {}
    Lz, const = C, c0 - mu @ cuts.d
    for i in range(L, -1, -1):
        c, nu = crown._back_step(net, i, Lz, Lh)
        const = const + c
        if nu is None:
            break
        j = i - 1
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
                       lr: float = 0.05, lr_mu: float = LR_MU, lr_beta: float = 0.05, alphas: dict | None = None,
                       betas: dict | None = None, splits: dict | None = None, mu: torch.Tensor | None = None,
                       taus: dict | None = None, sigmas: dict | None = None, moments=None,
                       deadline: float | None = None, out: dict | None = None, want_x: bool = False):
    """Best of ``iters`` Adam steps on ``α, τ, σ, μ`` (and ``β`` on split domains) of :func:`cut_bound`, from
    CROWN's relaxation or ``alphas`` (e.g. a parent's), ``betas`` (else 0), ``mu`` (D, m, K) (else 0: the first
    iterate is then the cut-free bound), ``taus``, ``sigmas`` (block → (D, m, |cuts.q_idx[j]|); else CROWN's
    upper slope and 0). ``moments``: ``(m, v, rows)``, Adam's bias-corrected moments of μ, τ, σ to go on from
    (``m`` and ``v`` each ``(mu, taus, sigmas)`` shaped like them) on the domains ``rows`` (D,) bool, e.g. a
    parent's (the others start at zero). Returns ``lb (D, m)``, or ``(lb, argmin (D, m, n_0))`` with
    ``want_x``; ``out`` receives the last iterate's ``"alphas"``, ``"betas"``, ``"taus"``, ``"sigmas"`` (block →
    (D, m, n_j)) and ``"mu_last"``, the best bound's ``"mu"`` (D, m, K), and ``"moments"``: ``(m, v)`` of μ, τ,
    σ after the last step in the form ``moments`` takes."""
    D, m = c0.shape
    al, ta, si, be = {}, {}, {}, {}
    relax = {j: crown.relaxation(lower[j], upper[j]) for j in range(net.n_layers - 1)}
    for j in range(net.n_layers - 1):
        a, s, _, _ = relax[j]
        init = alphas[j] if alphas is not None and j in alphas else a[:, None, :].expand(D, m, -1)
        al[j] = init.detach().clone().requires_grad_(True)
        idx = cuts.q_idx.get(j)
        if idx is not None and idx.numel():
            ta[j] = (taus[j] if taus is not None and j in taus else s[:, None, idx].expand(D, m, -1)).detach().clone() \
                .requires_grad_(True)
            si[j] = (sigmas[j].detach().clone() if sigmas is not None and j in sigmas else
                     torch.zeros(D, m, idx.numel(), dtype=net.dtype, device=net.device)).requires_grad_(True)
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
    # where μ, τ_j, σ_j sit in the groups: their moments can start from earlier steps and are handed back
    slots = {"mu": (1, 0), **{("tau", j): (0, len(al) + i) for i, j in enumerate(ta)},
             **{("sigma", j): (0, len(al) + len(ta) + i) for i, j in enumerate(si)}}
    if moments is not None:
        (m_mu, m_ta, m_si), (v_mu, v_ta, v_si), rows = moments
        start = {"mu": (m_mu, v_mu), **{("tau", j): (m_ta[j], v_ta[j]) for j in ta},
                 **{("sigma", j): (m_si[j], v_si[j]) for j in si}}
        for key, (gi, pi) in slots.items():
            opt.warm(gi, pi, *start[key], rows)
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
        mom = {key: opt.moments(gi, pi) for key, (gi, pi) in slots.items()}
        out["moments"] = tuple((mom["mu"][w], {j: mom["tau", j][w] for j in ta}, {j: mom["sigma", j][w] for j in si})
                               for w in (0, 1))
    return (best, best_X) if want_x else best
