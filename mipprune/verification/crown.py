"""Batched linear bounds on torch tensors (CPU or CUDA): CROWN, α-CROWN and β-CROWN.

The production bound engine of branch and bound (:mod:`mipprune.verification.bab`). The numpy
engine in :mod:`mipprune.verification.bounds` stays as the cheap root-stage engine (and LP) and as
the reference the tests compare against.

The network is seen as affine/ReLU blocks (:func:`solvers.network.ir.as_blocks`): ``z_i = W_i h_i +
b_i``, ``h_0 = x``, ``h_{i+1} = ReLU(z_i)``; the output is ``z_L``. Every function is batched over
``D`` sub-domains: per-domain input boxes ``lo, hi`` (D, n_0) and per-domain pre-activation bounds
``lower[i], upper[i]`` (D, n_i).

* :func:`backward_bound` — lower bound of ``C z_L + c`` (rows (D, m)) by back-substitution, with the
  CROWN relaxation of each ReLU (upper line ``u(z − l)/(u − l)``, lower line ``α z``). ``α`` may be
  given per (domain, row, neuron) (α-CROWN); split constraints ``z_j >= 0`` / ``z_j <= 0`` enter
  through multipliers ``β >= 0`` (β-CROWN: ``min f >= min f − β·s·z`` on the split domain).
* :func:`optimize_bound` — α (and β) optimized by projected gradient ascent (Adam); every
  iterate is a valid bound, the best per row is kept.
* :func:`forward_bounds` — intermediate bounds by forward linear propagation in terms of the input
  (cheap when the input has few coordinates: the input-splitting path).
* :func:`crown_intermediate` — intermediate bounds by full backward CROWN (root of ReLU BaB).

Round-off. On CPU everything runs in float64; bounds are then loosened by ``slack(dtype)``
(``1e-9`` relative + absolute in float64, ``1e-4`` in float32 on GPU) before any decision, so a bound
that is positive only by round-off never counts as "verified" (:func:`proven`). Counterexamples are
never taken from this module without the float64 forward re-check of the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from solvers.errors import InvalidInputError, SolverNotAvailableError

__all__ = ["TorchNet", "resolve_device", "slack", "proven", "interval_bounds", "forward_bounds",
           "crown_intermediate", "backward_bound", "optimize_bound", "concretize", "relaxation"]


def resolve_device(device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; CUDA must be available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolverNotAvailableError(f"device {device!r} needs CUDA, but this torch build sees no GPU; "
                                      "use device='cpu'")
    return dev


def slack(dtype: torch.dtype) -> float:
    """Relative+absolute margin by which bounds are loosened against round-off."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def proven(lb: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``lb > 0`` beyond round-off (a bound of +1e-13 on a true minimum of 0 must not verify)."""
    s = slack(dtype or lb.dtype)
    return lb > s * (1.0 + lb.abs())


def _loosen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = slack(lo.dtype)
    return lo - s * (1.0 + lo.abs()), hi + s * (1.0 + hi.abs())


@dataclass
class TorchNet:
    """Dense torch copies of the affine blocks: ``W[i]`` (n_i, n_{i-1}), ``b[i]`` (n_i,)."""

    W: list
    b: list
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_blocks(cls, blocks, device="cpu", dtype: torch.dtype | None = None) -> "TorchNet":
        dev = resolve_device(device)
        dt = dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
        W = [torch.as_tensor(np.asarray(blk.weight.toarray()), dtype=dt, device=dev) for blk in blocks]
        b = [torch.as_tensor(np.asarray(blk.bias), dtype=dt, device=dev) for blk in blocks]
        return cls(W, b, dev, dt)

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)

    def box(self, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
        """The input box as (1, n) tensors, rounded outward when this dtype is narrower than float64
        (a float32 box must contain the float64 one)."""
        lo64, hi64 = torch.as_tensor(np.asarray(lo, dtype=np.float64)), torch.as_tensor(np.asarray(hi, dtype=np.float64))
        l, u = lo64.to(self.dtype), hi64.to(self.dtype)
        if self.dtype != torch.float64:
            l = torch.where(l.double() > lo64, torch.nextafter(l, torch.full_like(l, -np.inf)), l)
            u = torch.where(u.double() < hi64, torch.nextafter(u, torch.full_like(u, np.inf)), u)
        return l.to(self.device)[None, :], u.to(self.device)[None, :]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Plain forward (N, n_0) → (N, n_L) in this net's dtype (attacks only; never a re-check)."""
        h = X
        for i in range(self.n_layers):
            z = h @ self.W[i].T + self.b[i]
            h = torch.relu(z) if i < self.n_layers - 1 else z
        return h


# ----------------------------------------------------------------------------------- relaxations
def relaxation(l: torch.Tensor, u: torch.Tensor):
    """CROWN relaxation on ``[l, u]`` (D, n): lower slope ``a`` (default α), upper slope ``s``,
    upper intercept ``t``, and the unstable mask; ``a z <= ReLU(z) <= s z + t``."""
    active = l >= 0
    unstable = (l < 0) & (u > 0)
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    s_un = torch.where(unstable, u / denom, torch.zeros_like(u))
    s = torch.where(active, torch.ones_like(u), s_un)
    t = torch.where(unstable, -s_un * l, torch.zeros_like(u))
    a = torch.where(active | (unstable & (u >= -l)), torch.ones_like(u), torch.zeros_like(u))
    return a, s, t, unstable


def concretize(Lam: torch.Tensor, const: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Exact minimum over the box of each row of ``Lam x + const``: ``Lam`` (D, m, n), ``const``
    (D, m), ``lo``/``hi`` (D, n). Returns (lb (D, m), argmin (D, m, n))."""
    lb = (Lam.clamp(min=0) * lo[:, None, :]).sum(-1) + (Lam.clamp(max=0) * hi[:, None, :]).sum(-1) + const
    X = torch.where(Lam > 0, lo[:, None, :], hi[:, None, :])
    return lb, X


def interval_layer(net: TorchNet, i: int, a: torch.Tensor, b: torch.Tensor):
    """Interval bounds of ``z_i`` from bounds ``a <= h_i <= b`` (D, n_{i-1})."""
    mid, rad = (a + b) / 2, (b - a) / 2
    c = mid @ net.W[i].T + net.b[i]
    r = rad @ net.W[i].abs().T
    return _loosen(c - r, c + r)


def interval_bounds(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor):
    """Interval (IBP) bounds of every block, batched: lists of (D, n_i)."""
    lower, upper = [], []
    a, b = lo, hi
    for i in range(net.n_layers):
        l, u = interval_layer(net, i, a, b)
        lower.append(l)
        upper.append(u)
        a, b = l.clamp(min=0), u.clamp(min=0)
    return lower, upper


def forward_bounds(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor, n_layers: int | None = None):
    """Intermediate bounds by forward linear propagation (symbolic intervals with CROWN's
    relaxation), intersected with IBP. Cost per domain O(Σ n_i n_{i-1} n_0): for few inputs.

    Returns lists ``lower, upper`` of (D, n_i) for blocks ``0 … n_layers−1`` (default all)."""
    n_layers = net.n_layers if n_layers is None else n_layers
    D, n0 = lo.shape
    eye = torch.eye(n0, dtype=net.dtype, device=net.device).expand(D, n0, n0)
    # linear functions of x: value = x @ A.T + c, A (D, n, n0), c (D, n)
    AL, cL, AU, cU = eye, torch.zeros(D, n0, dtype=net.dtype, device=net.device), eye, \
        torch.zeros(D, n0, dtype=net.dtype, device=net.device)
    lower, upper = [], []
    for i in range(n_layers):
        il, iu = interval_layer(net, i, lo, hi) if i == 0 else \
            interval_layer(net, i, lower[-1].clamp(min=0), upper[-1].clamp(min=0))
        Wp, Wn = net.W[i].clamp(min=0), net.W[i].clamp(max=0)
        zAL = Wp @ AL + Wn @ AU
        zcL = cL @ Wp.T + cU @ Wn.T + net.b[i]
        zAU = Wp @ AU + Wn @ AL
        zcU = cU @ Wp.T + cL @ Wn.T + net.b[i]
        l = concretize(zAL, zcL, lo, hi)[0]
        u = -concretize(-zAU, -zcU, lo, hi)[0]
        l, u = _loosen(l, u)
        l, u = torch.maximum(l, il), torch.minimum(u, iu)
        l = torch.minimum(l, u)
        lower.append(l)
        upper.append(u)
        if i == n_layers - 1:
            break
        a, s, t, _ = relaxation(l, u)
        # h >= a·zL (a >= 0), h <= s·zU + t (s >= 0)
        AL, cL = a[..., None] * zAL, a * zcL
        AU, cU = s[..., None] * zAU, s * zcU + t
    return lower, upper


# ----------------------------------------------------------------------------------- backward
def backward_bound(net: TorchNet, lower, upper, C: torch.Tensor, c0: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, *, layer: int | None = None, alphas: dict | None = None,
                   betas: dict | None = None, splits: dict | None = None):
    """Lower bound of ``C z_layer + c0`` over each domain (default ``layer`` = output block).

    ``C`` (D, m, n_layer), ``c0`` (D, m); ``lower[j], upper[j]`` (D, n_j) for ``j < layer``, with
    any ReLU splits already applied (active ⇒ ``l >= 0``, inactive ⇒ ``u <= 0``). ``alphas[j]``
    (D, m, n_j) in [0, 1] replace the default lower slopes of unstable neurons; ``betas[j]`` (D, m,
    n_j) >= 0 with ``splits[j]`` (D, n_j) in {−1, 0, +1} add the β-CROWN terms. Returns
    ``(lb (D, m), argmin (D, m, n_0), Lam (D, m, n_0))``.
    """
    layer = net.n_layers - 1 if layer is None else layer
    Lam, const = C, c0
    for i in range(layer, -1, -1):
        const = const + Lam @ net.b[i]
        Lam = Lam @ net.W[i]
        if i == 0:
            break
        j = i - 1
        a, s, t, unstable = relaxation(lower[j], upper[j])
        if alphas is not None and j in alphas:
            a = torch.where(unstable[:, None, :], alphas[j].clamp(0, 1), a[:, None, :])
        else:
            a = a[:, None, :]
        pos, neg = Lam.clamp(min=0), Lam.clamp(max=0)
        const = const + (neg * t[:, None, :]).sum(-1)
        Lam = pos * a + neg * s[:, None, :]
        if betas is not None and j in betas:
            Lam = Lam - betas[j].clamp(min=0) * splits[j][:, None, :]
    lb, X = concretize(Lam, const, lo, hi)
    return lb, X, Lam


def crown_intermediate(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor, start_lower=None, start_upper=None,
                       splits: dict | None = None):
    """Bounds of every block by backward CROWN layer by layer (batched over domains), intersected
    with IBP and ``start_*`` (lists of (D, n_i), e.g. LP-tightened root bounds); ReLU ``splits``
    (dict layer → (D, n) in {−1, 0, +1}) are applied as soon as a layer's bounds are known."""
    lower, upper = [], []
    D = lo.shape[0]
    for i in range(net.n_layers):
        n = net.W[i].shape[0]
        if i == 0:
            l, u = interval_layer(net, 0, lo, hi)
        else:
            il, iu = interval_layer(net, i, lower[-1].clamp(min=0), upper[-1].clamp(min=0))
            eye = torch.eye(n, dtype=net.dtype, device=net.device)
            C = torch.cat([eye, -eye], 0).expand(D, 2 * n, n)
            lb = backward_bound(net, lower, upper, C, torch.zeros(D, 2 * n, dtype=net.dtype, device=net.device),
                                lo, hi, layer=i)[0]
            l, u = _loosen(lb[:, :n], -lb[:, n:])
            l, u = torch.maximum(l, il), torch.minimum(u, iu)
        if start_lower is not None:
            l, u = torch.maximum(l, start_lower[i]), torch.minimum(u, start_upper[i])
        if splits is not None and i in splits:
            l, u = apply_splits(l, u, splits[i])
        lower.append(torch.minimum(l, u))
        upper.append(u)
    return lower, upper


def apply_splits(l: torch.Tensor, u: torch.Tensor, split: torch.Tensor):
    """Active (+1) ⇒ ``l = max(l, 0)``; inactive (−1) ⇒ ``u = min(u, 0)``."""
    return torch.where(split > 0, l.clamp(min=0), l), torch.where(split < 0, u.clamp(max=0), u)


# ----------------------------------------------------------------------------------- α/β optimization
class _Ascent:
    """Adam ascent steps (Kingma & Ba) on plain tensors. Not ``torch.optim.Adam``: its first
    construction in a process imports torch's compiler stack (measured 2.8 s), which would eat the
    time limit of short queries."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8):
        self.groups, (self.b1, self.b2), self.eps, self.t = groups, betas, eps, 0
        self.state = [[(torch.zeros_like(p), torch.zeros_like(p)) for p in g["params"]] for g in groups]

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for g, st in zip(self.groups, self.state):
            for p, (m, v) in zip(g["params"], st):
                if p.grad is None:
                    continue
                m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
                p.add_(g["lr"] * (m / c1) / ((v / c2).sqrt() + self.eps))


def optimize_bound(net: TorchNet, lower, upper, C: torch.Tensor, c0: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, *, splits: dict | None = None, iters: int = 20, lr_alpha: float = 0.1,
                   lr_beta: float = 0.05, alphas: dict | None = None, deadline: float | None = None):
    """α-CROWN (and β-CROWN when ``splits`` are given) lower bound of ``C z_L + c0``.

    Starts from CROWN's slopes (or ``alphas``), runs ``iters`` Adam steps of projected gradient
    ascent on the sum of the rows' bounds (rows already proven stop pulling), and keeps per row the
    best bound seen (each iterate is sound). Returns ``(lb (D, m), argmin (D, m, n_0), Lam of the
    first iterate, alphas)``; ``alphas`` can warm-start the children of a domain.
    """
    import time

    D, m = c0.shape
    L = net.n_layers
    with torch.no_grad():
        lb0, X0, Lam0 = backward_bound(net, lower, upper, C, c0, lo, hi)
    best, best_X = lb0.clone(), X0
    if iters <= 0 or bool(proven(best).all()):
        return best, best_X, Lam0, alphas
    params = []
    al = {}
    for j in range(L - 1):
        a, _, _, unstable = relaxation(lower[j], upper[j])
        if not bool(unstable.any()):
            continue
        init = alphas[j] if alphas is not None and j in alphas else a[:, None, :].expand(D, m, -1)
        al[j] = init.detach().clone().requires_grad_(True)
        params.append(al[j])
    be = {}
    if splits:
        for j, s in splits.items():
            if bool((s != 0).any()):
                be[j] = torch.zeros(D, m, s.shape[1], dtype=net.dtype, device=net.device, requires_grad=True)
    groups = []
    if al:
        groups.append({"params": list(al.values()), "lr": lr_alpha})
    if be:
        groups.append({"params": list(be.values()), "lr": lr_beta})
    if not groups:
        return best, best_X, Lam0, alphas
    opt = _Ascent(groups)
    for _ in range(iters):
        if deadline is not None and time.perf_counter() > deadline:
            break
        opt.zero_grad()
        lb, X, _ = backward_bound(net, lower, upper, C, c0, lo, hi, alphas=al, betas=be or None,
                                  splits=splits if be else None)
        with torch.no_grad():
            better = lb > best
            best = torch.where(better, lb, best)
            best_X = torch.where(better[..., None], X, best_X)
        done = proven(best)
        if bool(done.all()):
            break
        # rows already proven stop pulling on the shared slopes
        obj = torch.where(done, torch.zeros_like(lb), lb).sum()
        obj.backward()
        opt.step()
        with torch.no_grad():
            for p in al.values():
                p.clamp_(0, 1)
            for p in be.values():
                p.clamp_(min=0)
    return best.detach(), best_X.detach(), Lam0, {j: p.detach() for j, p in al.items()}
