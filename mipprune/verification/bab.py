"""Branch and bound on torch bounds (:mod:`.crown`): ReLU splitting and input splitting.

Both searches prove that, on every sub-domain, every open disjunct of the unsafe region has a row
whose margin ``(A y − b)_r`` is ``> 0`` (beyond round-off, :func:`crown.proven`), or find an input
whose **float64** forward output is unsafe (:meth:`Spec.is_counterexample`); nothing else is an
answer. Domains are processed in batches (``batch`` domains → ``2·batch`` children per step),
worst bound first; the batch size adapts so one step takes about ``STEP_SECONDS``, which keeps the
deadline to within about a second; the number of stored domains is capped (``max_domains``) so
memory stays bounded (hitting the cap ends the search as ``unknown``, with the reason).

* :func:`relu_bab` — β-CROWN-style: intermediate bounds are the root's (CROWN / LP-refined, given
  by the caller) with each domain's split neurons fixed; the output rows are bounded with α and β
  optimized per domain. Branching: the BaBSR-like intercept score ``max(−ν_j, 0)·(−u_j l_j/(u_j −
  l_j))`` (how much the bound loses to neuron ``j``'s upper relaxation, ``ν`` the back-substituted
  coefficient of the worst row). Open domains feed counterexample search: the bound minimizers are
  re-checked in float64, and every few steps PGD starts from them.
* :func:`input_bab` — for networks with few inputs: domains are input boxes, bounded by backward
  CROWN (intermediate layers too); a box is split in half along the coordinate with the
  largest ``|Λ_d|·width_d`` (smart branching on the worst row).
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mipprune.verification import crown
from mipprune.verification.crown import TorchNet
from solvers.network.spec import Spec

__all__ = ["BabResult", "relu_bab", "input_bab", "spec_rows"]

STEP_SECONDS = 0.5       # target wall time of one batch (adapts the batch size)
TORCH_THREADS = 1        # intra-op threads during a search (see torch_threads)
MAX_DOMAINS = 200_000    # cap on stored domains (memory bound)


@contextlib.contextmanager
def torch_threads(n: int = TORCH_THREADS):
    """Run with ``n`` torch intra-op threads, then restore. Small batched products dominate here:
    on the shared 2-core machine two OpenMP threads under load ran a 6x50 training loop 80x slower
    than one (41.6 s vs 0.5 s, measured); parallelism belongs to a pool over instances."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class BabResult:
    """``status``: "verified", "falsified", "timeout" or "unknown" (with ``message``)."""

    status: str
    counterexample: np.ndarray | None = None
    domains: int = 0          # domains bounded
    steps: int = 0
    max_queue: int = 0
    message: str = ""
    info: dict = field(default_factory=dict)


def spec_rows(spec: Spec, disjuncts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the given disjuncts: ``C`` (m, n_out), ``c0`` (m,) (margin ``C y + c0``) and the
    disjunct index of each row (0 … len(disjuncts)−1)."""
    C = np.vstack([spec.disjuncts[j][0] for j in disjuncts])
    c0 = -np.concatenate([spec.disjuncts[j][1] for j in disjuncts])
    owner = np.concatenate([np.full(spec.disjuncts[j][0].shape[0], k) for k, j in enumerate(disjuncts)])
    return C, c0, owner


def _disjunct_scores(lb: torch.Tensor, owner: torch.Tensor, n_disj: int) -> torch.Tensor:
    """Per domain and disjunct the best row bound (a disjunct is safe if any of its rows is > 0)."""
    out = torch.full((lb.shape[0], n_disj), -torch.inf, dtype=lb.dtype, device=lb.device)
    return out.scatter_reduce(1, owner.expand(lb.shape[0], -1), lb, reduce="amax")


def _domain_safe(lb: torch.Tensor, owner: torch.Tensor, n_disj: int) -> torch.Tensor:
    ok = crown.proven(lb).to(lb.dtype)
    per = torch.zeros((lb.shape[0], n_disj), dtype=lb.dtype, device=lb.device)
    per = per.scatter_reduce(1, owner.expand(lb.shape[0], -1), ok, reduce="amax")
    return (per > 0).all(dim=1)


class _Checker:
    """Float64 re-check of candidate inputs (and occasional PGD from them)."""

    def __init__(self, network, spec: Spec, seed: int):
        self.network, self.spec, self.seed = network, spec, seed
        self.checked = 0

    def __call__(self, X: np.ndarray) -> np.ndarray | None:
        if X.shape[0] == 0:
            return None
        X = np.clip(X, self.spec.lower, self.spec.upper)
        self.checked += X.shape[0]
        Y = self.network.forward(X)
        margins = np.array([self.spec.unsafe_margin(y) for y in Y])
        for k in np.argsort(margins)[:8]:
            if margins[k] > 0:
                break
            if self.spec.is_counterexample(self.network, X[k]):
                return X[k]
        return None

    def pgd(self, starts: np.ndarray, time_limit: float) -> np.ndarray | None:
        from mipprune.verification.attack import pgd_attack

        if time_limit <= 0.05 or starts.shape[0] == 0:
            return None
        x = pgd_attack(self.network, self.spec, restarts=1, steps=20, seed=self.seed, starts=starts,
                       time_limit=time_limit)
        return x if x is not None and self.spec.is_counterexample(self.network, x) else None


class _Batcher:
    """Adapts the batch size so that one step takes about STEP_SECONDS, and never plans a step
    longer than the time left (per-domain cost measured on the previous steps)."""

    def __init__(self, start: int, lo: int = 4, hi: int = 4096):
        self.size, self.lo, self.hi = start, lo, hi
        self.rate: float | None = None   # seconds per domain of the last full step

    def take(self, available: int, deadline: float | None) -> int:
        n = min(self.size, available)
        if deadline is not None and self.rate:
            left = deadline - time.perf_counter()
            n = min(n, max(1, int(left / self.rate)))
        return n

    def update(self, n: int, seconds: float) -> None:
        if n >= self.lo:
            self.rate = seconds / n
        if n < self.size:   # a partial batch says nothing about a full one
            return
        if seconds < 0.5 * STEP_SECONDS:
            self.size = min(self.hi, self.size * 2)
        elif seconds > 1.5 * STEP_SECONDS:
            self.size = max(self.lo, self.size // 2)


# ------------------------------------------------------------------------------------ ReLU splitting
def relu_bab(network, spec: Spec, blocks, root_lower, root_upper, disjuncts, *, deadline: float | None,
             device="cpu", seed: int = 0, iters: int = 10, root_iters: int = 50, max_domains: int = MAX_DOMAINS,
             batch: int = 32) -> BabResult:
    """Branch and bound over ReLU splits on the open ``disjuncts`` of ``spec`` (box regions).

    ``root_lower[i]``, ``root_upper[i]`` (numpy, (n_i,)) are sound pre-activation bounds of block
    ``i`` over the input box (e.g. LP-tightened); they stay fixed, only split neurons change. The
    root is bounded by α-CROWN for all disjuncts at once (``root_iters`` steps); the disjuncts it
    leaves open are then searched one at a time, most negative root bound first (a counterexample
    is most likely there, and on 2 CPU cores one output row per domain costs 1/9 of nine).
    """
    t0 = time.perf_counter()
    net = TorchNet.from_blocks(blocks, device)
    L = net.n_layers
    lo_in, hi_in = net.box(spec.lower, spec.upper)
    # splits live on ReLU blocks only; max-pool blocks keep their root bounds (a domain whose ReLUs
    # are all split but which is still open is left to an exact solve: "exhausted")
    rl = [net.tensor(a)[None, :] for a in root_lower[:L - 1]]
    ru = [net.tensor(a)[None, :] for a in root_upper[:L - 1]]
    check = _Checker(network, spec, seed)
    widths = [a.shape[1] for a in rl]
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    n_hidden = int(offsets[-1])
    res = BabResult("unknown", domains=1, steps=0)

    def bound(splits_flat: torch.Tensor, it: int, Cz, c0):
        """splits_flat (D, n_hidden) int8 → (lb (D, m), argmin X (D, m, n0), lower, upper)."""
        D = splits_flat.shape[0]
        lower, upper, splits = [], [], {}
        for j in range(L - 1):
            s = splits_flat[:, offsets[j]:offsets[j + 1]].to(net.dtype)
            l, u = crown.apply_splits(rl[j].expand(D, -1), ru[j].expand(D, -1), s)
            lower.append(l)
            upper.append(u)
            splits[j] = s
        Cb, cb = Cz.expand(D, -1, -1), c0.expand(D, -1)
        lo, hi = lo_in.expand(D, -1), hi_in.expand(D, -1)
        has_split = bool((splits_flat != 0).any())
        lb, X, _, _ = crown.optimize_bound(net, lower, upper, Cb, cb, lo, hi, splits=splits if has_split else None,
                                           iters=it, deadline=deadline)
        return lb, X, lower, upper

    def branch_scores(lower, upper, lb, Cz) -> torch.Tensor:
        """BaBSR-like intercept scores (D, n_hidden) from the worst open row's back-substitution
        (max-pool blocks are never split: score −1)."""
        worst = lb.argmin(dim=1)
        D = lb.shape[0]
        nus: dict = {}
        crown.backward_bound(net, lower, upper, Cz[worst][:, None, :], torch.zeros(D, 1, dtype=net.dtype,
                             device=net.device), lo_in.expand(D, -1), hi_in.expand(D, -1), record=nus)
        scores = []
        for j in range(L - 1):
            if not net.is_relu(j):
                scores.append(torch.full_like(lower[j], -1.0))
                continue
            _, _, t, unstable = crown.relaxation(lower[j], upper[j])
            nu = nus[j][:, 0, :]
            sc = nu.clamp(max=0).neg() * t + 1e-6 * (upper[j] - lower[j])   # tie-break: width
            scores.append(torch.where(unstable, sc, torch.full_like(sc, -1.0)))
        return torch.cat(scores, dim=1)

    # ---- root: all disjuncts at once
    C_np, c0_np, owner_np = spec_rows(spec, disjuncts)
    root_splits = torch.zeros((1, n_hidden), dtype=torch.int8, device=net.device)
    lb, X, _, _ = bound(root_splits, root_iters, net.tensor(C_np), net.tensor(c0_np))
    per = _disjunct_scores(lb, torch.as_tensor(owner_np, device=net.device)[None, :], len(disjuncts))[0]
    res.info["root_lb"] = float(lb.min())
    x = check(X.reshape(-1, X.shape[-1]).cpu().numpy())
    if x is not None:
        return BabResult("falsified", x, 1, 0, 1, "the α-CROWN minimizer is a counterexample")
    safe_rows = crown.proven(lb[0]).cpu().numpy()
    open_d = [k for k in range(len(disjuncts)) if not safe_rows[owner_np == k].any()]
    open_d.sort(key=lambda k: float(per[k]))
    res.info["root_open"] = len(open_d)
    if not open_d:
        res.status, res.message = "verified", "α-CROWN proves every open disjunct at the root"
        return res
    for n_done, k in enumerate(open_d):
        status = _search_rows(spec, [disjuncts[k]], bound, branch_scores, check, net, n_hidden, root_splits,
                              deadline, max_domains, batch, iters, res)
        if status != "verified":
            res.status = status
            if status == "timeout":
                res.message = f"time limit hit in disjunct {n_done + 1} of {len(open_d)} open after the root; " + \
                    res.message
            break
    else:
        res.status, res.message = "verified", f"all {res.domains} domains proven ({len(open_d)} disjunct(s) " \
            "open after the root)"
    res.info.update(time=time.perf_counter() - t0, checked=check.checked)
    return res


def _search_counterexample(check, cand: np.ndarray, last_pgd: float, deadline: float | None):
    """Re-check the open domains' candidate points (float64); failing that, PGD from the first 32 of
    them at most every ``5 · STEP_SECONDS``. Returns ``(counterexample or None, time of the last PGD)``."""
    x = check(cand)
    if x is None and time.perf_counter() - last_pgd > 5 * STEP_SECONDS:
        left = np.inf if deadline is None else deadline - time.perf_counter()
        x = check.pgd(cand[:32], min(STEP_SECONDS, left))
        last_pgd = time.perf_counter()
    return x, last_pgd


def _search_rows(spec, disjuncts, bound, branch_scores, check, net, n_hidden, root_splits, deadline, max_domains,
                 batch, iters, res: BabResult) -> str:
    """Best-first ReLU-split search on the rows of ``disjuncts``; updates ``res``, returns a status."""
    C_np, c0_np, owner_np = spec_rows(spec, disjuncts)
    Cz, c0 = net.tensor(C_np), net.tensor(c0_np)
    owner = torch.as_tensor(owner_np, device=net.device)[None, :]
    n_disj = len(disjuncts)
    counter = itertools.count()
    heap: list = []
    store: dict[int, torch.Tensor] = {}

    def push(rows: torch.Tensor, scores: torch.Tensor):
        for r in range(rows.shape[0]):
            k = next(counter)
            store[k] = rows[r]
            heapq.heappush(heap, (float(scores[r]), k))

    push(root_splits, torch.full((1,), -np.inf))
    batcher = _Batcher(batch)
    exhausted = 0          # domains with nothing left to split but not proven (need an exact solve)
    last_pgd = time.perf_counter()
    while heap:
        if deadline is not None and time.perf_counter() >= deadline:
            res.message = f"{len(heap)} open domains"
            return "timeout"
        if len(store) > max_domains:
            res.message = f"domain limit of {max_domains} reached (memory bound)"
            return "unknown"
        ts = time.perf_counter()
        take = [heapq.heappop(heap) for _ in range(batcher.take(len(heap), deadline))]
        parents = torch.stack([store.pop(k) for _, k in take])
        P = parents.shape[0]
        with torch.no_grad():
            lbp, _, lp_, up_ = bound(parents, 0, Cz, c0)
            sc = branch_scores(lp_, up_, lbp, Cz)
            sc = torch.where(parents != 0, torch.full_like(sc, -1.0), sc)
        best = sc.argmax(dim=1)
        ok = sc.gather(1, best[:, None])[:, 0] >= 0
        if not bool(ok.all()):
            exhausted += int((~ok).sum())
            parents, best = parents[ok], best[ok]
            P = parents.shape[0]
            if P == 0:
                continue
        children = parents.repeat(2, 1)
        idx = torch.arange(P, device=net.device)
        children[idx, best] = 1
        children[idx + P, best] = -1
        lb, X, _, _ = bound(children, iters, Cz, c0)
        res.domains += children.shape[0]
        res.steps += 1
        safe = _domain_safe(lb, owner, n_disj)
        open_idx = torch.nonzero(~safe)[:, 0]
        if open_idx.numel():
            Xo = X[open_idx]
            worst = lb[open_idx].argmin(dim=1)
            cand = Xo[torch.arange(open_idx.numel(), device=net.device), worst].cpu().numpy()
            x, last_pgd = _search_counterexample(check, cand, last_pgd, deadline)
            if x is not None:
                res.counterexample = x
                res.message = f"counterexample from an open domain after {res.domains} domains"
                return "falsified"
            push(children[open_idx], _disjunct_scores(lb[open_idx], owner, n_disj).min(dim=1).values)
        res.max_queue = max(res.max_queue, len(heap))
        batcher.update(P, time.perf_counter() - ts)
    if exhausted:
        res.message = f"{exhausted} fully split domain(s) left unproven (the bound is not exact there)"
        return "unknown"
    return "verified"


# ------------------------------------------------------------------------------------ input splitting
def input_bab(network, spec: Spec, blocks, disjuncts, *, deadline: float | None, device="cpu", seed: int = 0,
              max_domains: int = MAX_DOMAINS, batch: int = 256) -> BabResult:
    """Branch and bound over the input box (networks with few inputs; box regions only)."""
    t0 = time.perf_counter()
    net = TorchNet.from_blocks(blocks, device)
    C_np, c0_np, owner_np = spec_rows(spec, disjuncts)
    n_disj = len(disjuncts)
    owner = torch.as_tensor(owner_np, device=net.device)[None, :]
    Cz, c0 = net.tensor(C_np), net.tensor(c0_np)
    check = _Checker(network, spec, seed)
    res = BabResult("unknown")

    def bound(lo, hi):
        D = lo.shape[0]
        # backward CROWN per layer: on 5-input 6x50 nets 10-70x fewer boxes than forward
        # propagation for the same proofs, and 1-5x less time overall (measured)
        lower, upper = crown.crown_intermediate(net, lo, hi)
        lb, X, Lam = crown.backward_bound(net, lower, upper, Cz.expand(D, -1, -1), c0.expand(D, -1), lo, hi)
        return lb, X, Lam

    # pending boxes live in two tensors, ordered by the worst disjunct bound (lowest first)
    plo, phi = net.box(spec.lower, spec.upper)
    pscore = torch.full((1,), -torch.inf, dtype=net.dtype, device=net.device)
    batcher = _Batcher(batch, lo=16, hi=1 << 15)
    last_pgd = time.perf_counter()
    with torch.no_grad():
        while plo.shape[0]:
            if deadline is not None and time.perf_counter() >= deadline:
                res.status, res.message = "timeout", f"time limit hit with {plo.shape[0]} open boxes"
                break
            if plo.shape[0] > max_domains:
                res.status, res.message = "unknown", f"domain limit of {max_domains} reached (memory bound)"
                break
            ts = time.perf_counter()
            k = batcher.take(plo.shape[0], deadline)
            order = torch.argsort(pscore)
            take, keep = order[:k], order[k:]
            lo, hi = plo[take], phi[take]
            plo, phi, pscore = plo[keep], phi[keep], pscore[keep]
            lb, X, Lam = bound(lo, hi)
            res.domains += k
            res.steps += 1
            safe = _domain_safe(lb, owner, n_disj)
            op = torch.nonzero(~safe)[:, 0]
            if op.numel():
                worst = lb[op].argmin(dim=1)
                ar = torch.arange(op.numel(), device=net.device)
                cand = torch.cat([X[op, worst], (lo[op] + hi[op]) / 2]).cpu().numpy()
                x, last_pgd = _search_counterexample(check, cand, last_pgd, deadline)
                if x is not None:
                    res.status, res.counterexample = "falsified", x
                    res.message = f"counterexample in an open box after {res.domains} boxes"
                    break
                olo, ohi = lo[op], hi[op]
                width = ohi - olo
                lam = Lam[op, worst].abs()
                dim = torch.argmax(lam * width + 1e-12 * width, dim=1)
                if bool((width[ar, dim] <= 0).any()):
                    res.status, res.message = "unknown", "a box shrank to a point without a proof"
                    break
                mid = (olo[ar, dim] + ohi[ar, dim]) / 2
                lo2 = olo.clone()
                hi1 = ohi.clone()
                hi1[ar, dim] = mid
                lo2[ar, dim] = mid
                s = _disjunct_scores(lb[op], owner, n_disj).min(dim=1).values
                plo = torch.cat([plo, olo, lo2])
                phi = torch.cat([phi, hi1, ohi])
                pscore = torch.cat([pscore, s, s])
            res.max_queue = max(res.max_queue, plo.shape[0])
            batcher.update(k, time.perf_counter() - ts)
        else:
            res.status, res.message = "verified", f"all {res.domains} input boxes proven"
    res.info.update(time=time.perf_counter() - t0, batch=batcher.size, checked=check.checked)
    return res
