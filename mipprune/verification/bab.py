"""Branch and bound on torch bounds (:mod:`.crown`): ReLU splitting and input splitting.

Both searches prove that, on every sub-domain, every open disjunct of the unsafe region has a row
whose margin ``(A y − b)_r`` is ``> 0`` (beyond round-off, :func:`crown.proven`), or find an input
whose **float64** forward output is unsafe (:meth:`Spec.is_counterexample`); nothing else is an
answer. Domains are processed in batches (``batch`` domains → ``2·batch`` children per step),
worst bound first; the batch size adapts so one step takes about ``STEP_SECONDS``, which keeps the
deadline to within about a second; the number of stored domains is capped (``max_domains``) so
memory stays bounded (hitting the cap ends the search as ``unknown``, with the reason).

* :func:`relu_bab` — β-CROWN-style: intermediate bounds are the root's (CROWN / α-CROWN /
  LP-refined, given by the caller) with each domain's split neurons fixed (optionally re-bounded
  below the first split: ``intermediate``); the output rows are bounded with α and β optimized per
  domain, **warm-started from the parent's** α/β (each domain stores them, compactly on the
  root-unstable neurons), the Adam steps in float32 and the bound evaluated in float64
  (``fast32``). Open disjuncts with the same number of rows are searched together (one heap, one
  batch). Branching: the BaBSR-like intercept score ``max(−ν_j, 0)·(−u_j l_j/(u_j − l_j))`` (how
  much the bound loses to neuron ``j``'s upper relaxation, ``ν`` the back-substituted coefficient
  of the worst row), or filtered smart branching over its top ``candidates``. Both children are
  first bounded with the parent's α/β (one backward pass, ``SCREEN``): those it proves are not
  optimized (OVAL21 base img3568: 43 % of the children). Open domains feed
  counterexample search: the bound minimizers are re-checked in float64, and PGD starts from them
  every 2.5 s at first, less often the longer it finds nothing (``_PgdClock``). Cutting planes
  (GCP-CROWN, :mod:`.cuts`) enter every domain's bound, given at the start (``cuts``) or joining the
  running search (``cut_source``: its domains are kept, only the root's cut multipliers are optimized
  anew). The frontier is logged every ``LOG_EVERY`` s at DEBUG level.
* :func:`input_bab` — for networks with few inputs: domains are input boxes, bounded by backward
  CROWN (intermediate layers too); a box is split in half along the coordinate with the
  largest ``|Λ_d|·width_d`` (smart branching on the worst row).
"""
from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mipprune.verification import crown
from mipprune.verification.clauses import ConflictClauses
from mipprune.verification.crown import TorchNet
from mipprune.verification.cuts import Cuts, cut_bound, cuts_from_columns, optimize_cut_bound
from solvers.network.spec import Spec

__all__ = ["BabResult", "relu_bab", "input_bab", "spec_rows"]

_log = logging.getLogger(__name__)
LOG_EVERY = 20.0         # seconds between progress lines of a search (logging, DEBUG)

STEP_SECONDS = 0.5       # target wall time of one batch (adapts the batch size)
TORCH_THREADS = 1        # intra-op threads during a search (see torch_threads)
MAX_DOMAINS = 200_000    # cap on stored domains (memory bound; CPU) …
MAX_STORE_BYTES = 2 << 30  # … and on their splits + warm-start α/β together (2 GiB; CPU)
# On a GPU the domains live in device memory and are bounded ~10x faster than on 2 CPU cores: the CPU caps
# ended OVAL21 wide and MNIST 256x6 searches on an H200 within seconds (session 12). There the store may
# take this share of the device memory free when the search starts, and hold up to CUDA_MAX_DOMAINS.
CUDA_STORE_FRACTION = 0.4
CUDA_MAX_DOMAINS = 2_000_000
SCREEN = True            # bound both children with the parent's α/β first; optimize only those left open
PGD_EVERY = 2.5          # first interval between PGD runs in a search (s; see _PgdClock) …
PGD_BACKOFF = 1.5        # … stretched by this after each PGD that found nothing …
PGD_EVERY_MAX = 30.0     # … up to this
CUT_ROOT_ITERS = 300     # Adam steps of the root's bound with cuts (its μ starts every child's; ~2-3 s on OVAL21)
# Steps (α and τ, σ; β; μ) of a child whose parent was bounded with the same cuts: it starts from the parent's
# α, β, μ, τ, σ (its "cut state"), so small steps refine instead of re-climbing (OVAL21 wide img9916, 64 frontier
# domains, 10 steps: −0.207 from the root's μ and CROWN's τ, σ at (0.1, 0.05, 0.001), where they start at −0.456;
# from their own state −0.170 at those steps, −0.103 at (0.02, 0.02, 0.0002), −0.100 at (0.01, 0.01, 0.0001)) …
CUT_CHILD_LRS = (0.02, 0.02, 0.0002)
# … and Adam's moments of μ, τ, σ go on from the parent's (packed beside its state, float16, as the store's room
# allows): its first steps are then not Adam's fresh lr·sign(g) on every multiplier. 64 frontier domains after
# 400 s, four generations of 10 steps down the worse child: −0.083 → +0.003 restarting Adam, +0.012 going on
# with the moments, +0.019 with them at these steps (twice the steps above; +0.001 restarting); the moments of α,
# β add nothing (+0.003), those of μ alone +0.012, √v alone +0.008
CUT_MOMENTS = True
CUT_STATE_DTYPE = torch.float16   # stored cut states: a warm start only (any μ, σ >= 0, τ ∈ [0, 1] is sound)
LEARN_DROP = (0.25, 0.5, 0.75)   # shares of a proven domain's literals (least important first) clauses try to drop


# The intra-op threads of the searches in the current verify() call (verify(threads=...) sets it).
SEARCH_THREADS: contextvars.ContextVar[int] = contextvars.ContextVar("search_threads", default=TORCH_THREADS)


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Run with ``n`` torch intra-op threads (default: ``SEARCH_THREADS``, one unless ``verify(threads=…)``
    says otherwise), then restore. One by default: on the shared 2-core machine two OpenMP threads under
    load ran a 6x50 training loop 80x slower than one (41.6 s vs 0.5 s, measured), and a pool over instances
    uses the cores better; a single query on an otherwise idle machine gains from more (OVAL21 deep
    img1052, 60 s on 2 quiet cores: 12,577 domains with two threads against 7,801 with one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(SEARCH_THREADS.get() if n is None else n)
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
        # Spec.unsafe_margin for every row at once (ranking only: is_counterexample decides)
        margins = np.min([np.max(Y @ A.T - b, axis=1) for A, b in self.spec.disjuncts], axis=0)
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


def store_limits(device: torch.device, max_domains: int | None, max_store_bytes: int | None) -> tuple[int, int]:
    """``(max_domains, max_store_bytes)`` of a search on ``device``: the caller's, else the device's
    defaults (CPU: ``MAX_DOMAINS`` and ``MAX_STORE_BYTES``; CUDA: ``CUDA_MAX_DOMAINS`` and
    ``CUDA_STORE_FRACTION`` of the memory free now)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return (CUDA_MAX_DOMAINS if max_domains is None else max_domains,
                int(CUDA_STORE_FRACTION * free) if max_store_bytes is None else int(max_store_bytes))
    return (MAX_DOMAINS if max_domains is None else max_domains,
            MAX_STORE_BYTES if max_store_bytes is None else int(max_store_bytes))


def _out_of_memory(res: "BabResult", what: str) -> None:
    """A search that ran the device out of memory ends as ``unknown`` with the reason (the caller's
    next stage gets the rest of the time), its tensors freed."""
    res.status = "unknown"
    res.message = (f"device memory full after {res.domains} {what} (give the search less with "
                   "max_store_bytes=, or run fewer searches per GPU)")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ ReLU splitting
class _ReluState:
    """What every domain of a ReLU-split search shares: the network, the root's pre-activation
    bounds (fixed; a domain changes only its split neurons, and with ``intermediate`` the bounds
    below its first split), the split layout and the compact layout of α and β.

    A domain is ``(splits (n_hidden,) int8, A (m, n_slots), B (m, n_slots))``: its split decisions
    (+1 active, −1 inactive, 0 open) over all hidden neurons, and the α (lower ReLU slopes / max-pool
    τ) and β (split multipliers) it was last bounded with, on "slots": the root-unstable neurons of
    each ReLU block (every other neuron is stable on every sub-domain, its α unused) and all outputs
    of each max-pool block. They warm-start the children's optimization; stored in float32, since
    any α in [0, 1] and β >= 0 gives a sound bound, their precision never matters for soundness."""

    def __init__(self, net: TorchNet, rl, ru, lo_in, hi_in, intermediate: bool, fast32: bool = False, cuts=None,
                 conv: bool = False):
        self.net, self.rl, self.ru, self.lo_in, self.hi_in = net, rl, ru, lo_in, hi_in
        self.intermediate, self.fast32, self.net32, self.conv = intermediate, fast32, None, conv
        self.cuts = cuts          # cutting planes valid on the whole input box (GCP-CROWN bounds), or None
        self.cut_mu = None        # (G, m, K) the root's cut multipliers per searched disjunct (children start there)
        self.cuts32 = None
        self.cut_gen = 0          # bumped whenever the cuts change; a domain's cut state is of one generation …
        self.cut_base_gen = 0     # … and carries over from this one on (the cuts since extend its cuts) …
        self.cut_layouts = {0: self._layout()} if cuts is not None else {}   # … by each generation's layout
        self._root_tau = {}
        self.L = net.n_layers
        widths = [a.shape[1] for a in rl]
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        self.n_hidden = int(self.offsets[-1])
        self.root_unstable = [torch.nonzero((a[0] < 0) & (b[0] > 0))[:, 0] for a, b in zip(rl, ru)]
        self.slot_idx = [self.root_unstable[j] if net.is_relu(j) else
                         torch.arange(net.pool[j].shape[0], device=net.device) for j in range(self.L - 1)]
        self.slot_off = np.concatenate([[0], np.cumsum([i.numel() for i in self.slot_idx])]).astype(int)
        self.n_slots = int(self.slot_off[-1])
        # the splittable neurons (root-unstable ReLUs) in the split vector, and their α/β slots
        relu = [j for j in range(self.L - 1) if net.is_relu(j)]
        self.split_idx = torch.cat([self.root_unstable[j] + int(self.offsets[j]) for j in relu]) if relu else \
            torch.zeros(0, dtype=torch.long, device=net.device)
        self.split_lower = torch.cat([a[0] for a in rl])[self.split_idx]
        self.split_upper = torch.cat([b[0] for b in ru])[self.split_idx]
        self.split_slot = torch.cat([torch.arange(self.slot_off[j], self.slot_off[j + 1], device=net.device)
                                     for j in relu]) if relu else torch.zeros(0, dtype=torch.long, device=net.device)

    def optimize(self, lower, upper, C, c0, splits, alphas, betas, iters, deadline, out, lrs, mu=None, state=None,
                 moment_rows=None):
        """α/β-CROWN bound of ``C z_L + c0`` on a batch of domains from warm-started α/β. With
        ``fast32`` (float64 nets) the Adam steps run in float32 (1.5x faster on a CPU, measured) and
        the bound is then evaluated once in float64 at their last α/β: the α ∈ [0, 1] and β >= 0 of
        any iterate give a sound bound, the float32 steps only choose them. Returns ``(lb, argmin)``
        and fills ``out`` with ``"alphas"``/``"betas"``. With cuts, ``state`` (D, m, :meth:`cut_state_width`, or
        three times that with Adam's moments) a parent's packed μ, τ, σ to start from (else ``mu`` and the default
        τ, σ), ``moment_rows`` (D,) bool the rows whose moments are real (the others zero padding), ``lrs`` (α,
        β[, μ]), and ``out["cut_state"]`` receives the children's (with their moments: :data:`CUT_MOMENTS`)."""
        net, D = self.net, C.shape[0]
        lo, hi = self.lo_in.expand(D, -1), self.hi_in.expand(D, -1)
        if self.cuts is not None:   # GCP-CROWN: α, β, the indicator multipliers and μ together
            return self._optimize_with_cuts(lower, upper, C, c0, lo, hi, splits, alphas, betas, iters, deadline, out,
                                            lrs, mu, state, moment_rows)
        if not (self.fast32 and net.dtype == torch.float64) or iters <= 0:
            lb, X, _, _ = crown.optimize_bound(net, lower, upper, C, c0, lo, hi, splits=splits, iters=iters,
                                               alphas=alphas, betas=betas, deadline=deadline, out=out,
                                               lr_alpha=lrs[0], lr_beta=lrs[1])
            return lb, X
        if self.net32 is None:
            self.net32 = net.to_dtype(torch.float32, self.conv)
        f = lambda t: t.float()  # noqa: E731
        o32: dict = {}
        crown.optimize_bound(self.net32, [f(t) for t in lower], [f(t) for t in upper], f(C), f(c0), f(lo), f(hi),
                             splits={j: f(t) for j, t in splits.items()}, iters=iters,
                             alphas={j: f(t) for j, t in alphas.items()}, betas={j: f(t) for j, t in betas.items()},
                             deadline=deadline, out=o32, lr_alpha=lrs[0], lr_beta=lrs[1], want_x=False)
        d = lambda t: t.to(net.dtype)  # noqa: E731
        lbs = []
        relax = {j: crown.relaxation(lower[j], upper[j]) for j in range(self.L - 1) if net.is_relu(j)}
        with torch.no_grad():   # float64 bounds at the last and at the best float32 iterate: the larger
            for ka, kb in (("alphas", "betas"), ("best_alphas", "best_betas")):
                al = {**alphas, **{j: d(t).clamp(0, 1) for j, t in o32.get(ka, {}).items()}}
                be = {**betas, **{j: d(t).clamp(min=0) for j, t in o32.get(kb, {}).items()}}
                lbs.append(crown.backward_bound(net, lower, upper, C, c0, lo, hi, alphas=al, betas=be,
                                                splits=splits, relax=relax)[:2])
                if ka == "alphas":
                    out["alphas"], out["betas"] = al, be
        lb = torch.maximum(lbs[0][0], lbs[1][0])
        X = torch.where((lbs[0][0] >= lbs[1][0])[..., None], lbs[0][1], lbs[1][1])
        return lb, X

    def _optimize_with_cuts(self, lower, upper, C, c0, lo, hi, splits, alphas, betas, iters, deadline, out, lrs, mu,
                            state=None, moment_rows=None):
        """:meth:`optimize` with the cuts: the Adam steps in float32 with ``fast32`` (as without cuts), the bound
        then evaluated once in float64 with the float64 cuts at the last iterate (any α, τ ∈ [0, 1], σ, β, μ >= 0
        give a sound bound)."""
        net = self.net
        kw = dict(iters=iters, lr=lrs[0], lr_beta=lrs[1], deadline=deadline)
        if len(lrs) > 2:
            kw["lr_mu"] = lrs[2]
        taus = sigmas = moments = None
        if state is not None:
            mu, taus, sigmas = self.unpack_cut_state(state)
            moments = self.unpack_moments(state)
            if moments is not None:   # rows without moments (zero-padded) start them afresh
                moments = (*moments, torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
                           if moment_rows is None else moment_rows)
        if not (self.fast32 and net.dtype == torch.float64) or iters <= 0:
            lb, X = optimize_cut_bound(net, lower, upper, C, c0, lo, hi, self.cuts, alphas=alphas, betas=betas,
                                       splits=splits, mu=mu, taus=taus, sigmas=sigmas, moments=moments, out=out,
                                       want_x=True, **kw)
            out["cut_state"] = self.pack_cut_state(out["mu_last"], out["taus"], out["sigmas"],
                                                   out["moments"] if CUT_MOMENTS else None)
            return lb, X
        if self.net32 is None:
            self.net32 = net.to_dtype(torch.float32, self.conv)
        if self.cuts32 is None:
            self.cuts32 = self.cuts.to(torch.float32)
        f = lambda t: t.float()  # noqa: E731
        o32: dict = {}
        optimize_cut_bound(self.net32, [f(t) for t in lower], [f(t) for t in upper], f(C), f(c0), f(lo), f(hi),
                           self.cuts32, alphas={j: f(t) for j, t in alphas.items()},
                           betas={j: f(t) for j, t in betas.items()}, splits={j: f(t) for j, t in splits.items()},
                           mu=None if mu is None else f(mu), taus=None if taus is None else {j: f(t) for j, t in taus.items()},
                           sigmas=None if sigmas is None else {j: f(t) for j, t in sigmas.items()},
                           moments=None if moments is None else _cast_moments(moments, f), out=o32, **kw)
        d = lambda t: t.to(net.dtype)  # noqa: E731
        al = {j: d(t).clamp(0, 1) for j, t in o32["alphas"].items()}
        ta = {j: d(t).clamp(0, 1) for j, t in o32["taus"].items()}
        si = {j: d(t).clamp(min=0) for j, t in o32["sigmas"].items()}
        be = {j: d(t).clamp(min=0) for j, t in o32["betas"].items()}
        mu_last = d(o32["mu_last"]).clamp(min=0)
        with torch.no_grad():
            lb, X = cut_bound(net, lower, upper, C, c0, lo, hi, self.cuts, mu_last, al, ta, si,
                              betas=be or None, splits=splits if be else None)
        out["alphas"], out["betas"] = al, be
        out["cut_state"] = self.pack_cut_state(mu_last, ta, si, o32["moments"] if CUT_MOMENTS else None)
        return lb, X

    def _q_blocks(self) -> list:
        return [j for j in sorted(self.cuts.q_idx) if self.cuts.q_idx[j].numel()]

    def _layout(self):
        return self.cuts.K, {j: self.cuts.q_idx[j] for j in self._q_blocks()}

    def set_cuts(self, cuts: Cuts, mu: torch.Tensor) -> None:
        """New cuts (and the root's multipliers ``mu`` with them): a new generation of cut states; stored states
        of older ones carry over where the new cuts extend theirs (:meth:`Cuts.extends`)."""
        old = self.cuts
        self.cut_gen += 1
        if old is None or not cuts.extends(old):
            self.cut_base_gen = self.cut_gen
        self.cuts, self.cuts32, self.cut_mu = cuts, None, mu
        self.cut_layouts[self.cut_gen] = self._layout()

    def current_state(self, held):
        """A stored ``(generation, state (m, width))`` as a state of the current cuts, or ``None`` where it does
        not carry over: the old cuts' μ in place (the new ones' 0), τ and σ by neuron (the new indicator
        neurons': the root's upper slope and 0; a domain's unsplit neurons keep the root's bounds)."""
        if held is None or held[0] < self.cut_base_gen:
            return None
        gen, W = held
        if gen == self.cut_gen:
            return W
        K_old, q_old = self.cut_layouts[gen]
        new = torch.zeros((W.shape[0], self.cut_state_width()), dtype=W.dtype, device=W.device)
        new[:, :K_old] = W[:, :K_old]
        old_at, at_o = {}, K_old
        for j, idx in q_old.items():
            old_at[j] = at_o
            at_o += 2 * idx.numel()
        at = self.cuts.K
        for j in self._q_blocks():
            idx = self.cuts.q_idx[j]
            n = idx.numel()
            if j not in self._root_tau:
                self._root_tau[j] = crown.relaxation(self.rl[j], self.ru[j])[1][0]
            new[:, at:at + n] = self._root_tau[j][idx].to(W.dtype)
            if j in q_old:
                pos = torch.searchsorted(idx, q_old[j])
                n_o, o = q_old[j].numel(), old_at[j]
                new[:, at + pos] = W[:, o:o + n_o]
                new[:, at + n + pos] = W[:, o + n_o:o + 2 * n_o]
            at += 2 * n
        return new

    def cut_state_width(self, gen: int | None = None) -> int:
        """Numbers per row of a packed cut state (of the cuts of generation ``gen``, default the current ones): μ
        (K), then τ and σ of each block's indicator neurons."""
        K, q = self.cut_layouts[self.cut_gen if gen is None else gen]
        return K + 2 * sum(int(idx.numel()) for idx in q.values())

    def pack_cut_state(self, mu: torch.Tensor, taus: dict, sigmas: dict, moments=None) -> torch.Tensor:
        """``mu`` (D, m, K), ``taus``/``sigmas`` (block → (D, m, ·)) → (D, m, :meth:`cut_state_width`) in
        :data:`CUT_STATE_DTYPE`; with ``moments`` (``(m, v)``, each ``(mu, taus, sigmas)``: Adam's bias-corrected
        moments, :func:`.cuts.optimize_cut_bound`'s ``out["moments"]``) three times as wide: the state, ``m``, and
        ``√v`` (float16 holds √v of gradients down to 1e-4 as normal numbers, v itself only to 1e-2)."""
        def flat(mu, taus, sigmas):
            parts = [mu.detach()] + [t[j].detach() for j in self._q_blocks() for t in (taus, sigmas)]
            return torch.cat([p.to(CUT_STATE_DTYPE) for p in parts], dim=-1)
        if moments is None:
            return flat(mu, taus, sigmas)
        m, v = moments
        return torch.cat([flat(mu, taus, sigmas), flat(*m), flat(*_map_cut_state(torch.sqrt, v))], dim=-1)

    def unpack_cut_state(self, state: torch.Tensor):
        """Inverse of :meth:`pack_cut_state` (the state part), in the net's dtype: ``(mu, taus, sigmas)``."""
        dt = self.net.dtype
        K = self.cuts.K
        mu, at, taus, sigmas = state[..., :K].to(dt), K, {}, {}
        for j in self._q_blocks():
            n = int(self.cuts.q_idx[j].numel())
            taus[j], sigmas[j] = state[..., at:at + n].to(dt), state[..., at + n:at + 2 * n].to(dt)
            at += 2 * n
        return mu, taus, sigmas

    def unpack_moments(self, state: torch.Tensor):
        """The moments :meth:`pack_cut_state` packed beside the state, ``(m, v)`` each ``(mu, taus, sigmas)`` in
        the net's dtype, or ``None`` where the state has none."""
        w = self.cut_state_width()
        if state.shape[-1] == w:
            return None
        m = self.unpack_cut_state(state[..., w:2 * w])
        return m, _map_cut_state(torch.square, self.unpack_cut_state(state[..., 2 * w:]))

    def layers(self, S: torch.Tensor):
        """``S`` (D, n_hidden) int8 → per-block ``lower, upper`` (D, n_j) with the splits applied
        (recomputed below the first split when ``intermediate``) and ``splits`` (block → (D, n_j))."""
        net, D = self.net, S.shape[0]
        splits = {j: S[:, self.offsets[j]:self.offsets[j + 1]].to(net.dtype) for j in range(self.L - 1)}
        if self.intermediate:
            lower, upper = crown.split_intermediate(net, self.rl, self.ru, splits, self.lo_in.expand(D, -1),
                                                    self.hi_in.expand(D, -1), rows=self.root_unstable)
            return lower, upper, splits
        lower, upper = [], []
        for j in range(self.L - 1):
            l, u = crown.apply_splits(self.rl[j].expand(D, -1), self.ru[j].expand(D, -1), splits[j])
            lower.append(l)
            upper.append(u)
        return lower, upper, splits

    def expand(self, A: torch.Tensor, B: torch.Tensor):
        """Compact ``A, B`` (D, m, n_slots) → ``alphas`` (block → (D, m, ·)) and ``betas`` (ReLU block →
        (D, m, n_j); zero off the slots)."""
        net = self.net
        D, m = A.shape[:2]
        A, B = A.to(net.dtype), B.to(net.dtype)
        alphas, betas = {}, {}
        for j in range(self.L - 1):
            idx = self.slot_idx[j]
            if not idx.numel():
                continue
            sl = slice(self.slot_off[j], self.slot_off[j + 1])
            if net.is_relu(j):
                n = net.W[j].shape[0]
                a = torch.zeros(D, m, n, dtype=net.dtype, device=net.device)
                a[:, :, idx] = A[:, :, sl]
                b = torch.zeros(D, m, n, dtype=net.dtype, device=net.device)
                b[:, :, idx] = B[:, :, sl]
                alphas[j], betas[j] = a, b
            else:
                alphas[j] = A[:, :, sl].clone()
        return alphas, betas

    def compact(self, alphas: dict, betas: dict, lower, upper, D: int, m: int):
        """Inverse of :meth:`expand` (blocks missing from ``alphas`` take CROWN's default slopes)."""
        net = self.net
        A = torch.zeros(D, m, self.n_slots, dtype=torch.float32, device=net.device)
        B = torch.zeros(D, m, self.n_slots, dtype=torch.float32, device=net.device)
        for j in range(self.L - 1):
            idx = self.slot_idx[j]
            if not idx.numel():
                continue
            sl = slice(self.slot_off[j], self.slot_off[j + 1])
            if j in alphas:
                A[:, :, sl] = alphas[j][:, :, idx].to(torch.float32)
            elif net.is_relu(j):
                A[:, :, sl] = crown.relaxation(lower[j], upper[j])[0][:, None, idx].to(torch.float32)
            else:
                _, gap, _, _ = crown.pool_relaxation(lower[j], upper[j], net.pool[j])
                A[:, :, sl] = crown._pool_tau(gap)[:, None, :].to(torch.float32)
            if j in betas and net.is_relu(j):
                B[:, :, sl] = betas[j][:, :, idx].to(torch.float32)
        return A, B

    def scores(self, lower, upper, nus: dict, worst: torch.Tensor) -> torch.Tensor:
        """BaBSR-like intercept scores (D, n_hidden) of the worst row: ``max(−ν_j, 0)·(−u_j l_j/(u_j −
        l_j))``, how much the bound loses to neuron ``j``'s upper relaxation (``ν`` its back-substituted
        coefficient); −1 where nothing can be split (stable neurons, max-pool blocks)."""
        D = worst.shape[0]
        ar = torch.arange(D, device=worst.device)
        out = []
        for j in range(self.L - 1):
            if not self.net.is_relu(j):
                out.append(torch.full_like(lower[j], -1.0))
                continue
            _, _, t, unstable = crown.relaxation(lower[j], upper[j])
            nu = nus[j][ar, worst]
            sc = nu.clamp(max=0).neg() * t + 1e-6 * (upper[j] - lower[j])   # tie-break: width
            out.append(torch.where(unstable, sc, torch.full_like(sc, -1.0)))
        return torch.cat(out, dim=1)


def relu_bab(network, spec: Spec, blocks, root_lower, root_upper, disjuncts, *, deadline: float | None,
             device="cpu", seed: int = 0, iters: int = 10, root_iters: int = 50, max_domains: int | None = None,
             batch: int = 32, intermediate: bool = False, candidates: int = 1, lr_alpha: float = 0.1,
             lr_beta: float = 0.05, joint: bool = True, fast32: bool = True,
             max_store_bytes: int | None = None, screen: bool | None = None, clauses: bool = False,
             cuts: Cuts | None = None, cut_source=None, conv: bool = False) -> BabResult:
    """Branch and bound over ReLU splits on the open ``disjuncts`` of ``spec`` (box regions).

    ``root_lower[i]``, ``root_upper[i]`` (numpy, (n_i,)) are sound pre-activation bounds of block
    ``i`` over the input box (e.g. LP-tightened); they stay fixed, only split neurons change (and,
    with ``intermediate``, the bounds of blocks below a domain's first split are re-bounded by
    CROWN). The root is bounded by α-CROWN for all disjuncts at once (``root_iters`` steps); the
    disjuncts it leaves open are then searched one at a time, most negative root bound first (a
    counterexample is most likely there, and on 2 CPU cores one output row per domain costs 1/9 of
    nine). Each domain keeps the α/β it was bounded with; its children start from them and run
    ``iters`` more steps. Branching: ``candidates`` = 1 takes the best intercept score; more is
    filtered smart branching: the top ``candidates`` neurons are each split tentatively and bounded
    with the parent's α/β (one backward pass per child), and the neuron whose worse child bound is
    highest wins; children that this bound already proves are not bounded again. ``screen`` (default
    :data:`SCREEN`) does that last part with one candidate too: both children are first bounded with the
    parent's α/β (one backward pass) and only those it leaves open are optimized. ``cuts``: cutting planes
    valid on the whole input box (:class:`.cuts.Cuts`, or a MILP's :class:`solvers.milp_cuts.RootCuts` on these
    root bounds): the root and every optimized child are bounded with them (GCP-CROWN, float64; each child
    starts from its parent's multipliers, :data:`CUT_CHILD_LRS`, or the root's where the parent has none).
    ``cut_source``: cuts that join the running search (e.g. a MILP solver's, computed only once a plain search
    has not ended): an object with ``due() -> bool``, asked before every
    step, and ``__call__(frontier) -> cuts or None``, called when due with the open disjuncts' worst stored
    bounds (disjunct index → bound); the cuts returned replace the current ones (pass the union), the root's
    multipliers are optimized with them and disjuncts they prove at the root leave the search (the stored
    domains keep their bounds: cuts only tighten). ``clauses``: learn
    conflict clauses from proven children (their splits less the least important quarter, half or
    three quarters, kept where the bound proves the shorter set too) and propagate them on every domain
    (implied splits, domains inside a proven region dropped): :mod:`.clauses`; counts in
    ``info["clauses"]``. ``conv``: conv blocks compute their float32 products by ``conv2d`` / ``conv_transpose2d``
    instead of CSR (:data:`.crown.CONV_DTYPE`; opt-in: no faster on 2 CPU cores in whole searches).

    Memory: at most ``max_domains`` stored domains and ``max_store_bytes`` of their splits and α/β
    (default: :func:`store_limits` of the device); reaching either, or running the device out of
    memory, ends the search as ``unknown`` with the reason.
    """
    t0 = time.perf_counter()
    net = TorchNet.from_blocks(blocks, device, conv=conv)
    max_domains, max_store_bytes = store_limits(net.device, max_domains, max_store_bytes)
    L = net.n_layers
    lo_in, hi_in = net.box(spec.lower, spec.upper)
    # splits live on ReLU blocks only; max-pool blocks keep their root bounds (a domain whose ReLUs
    # are all split but which is still open is left to an exact solve: "exhausted")
    rl = [net.tensor(a)[None, :] for a in root_lower[:L - 1]]
    ru = [net.tensor(a)[None, :] for a in root_upper[:L - 1]]
    if cuts is not None:
        cuts = _on_net(cuts, net)
    st = _ReluState(net, rl, ru, lo_in, hi_in, intermediate, fast32, cuts, conv)
    check = _Checker(network, spec, seed)
    res = BabResult("unknown", domains=1, steps=0)

    # ---- root: all disjuncts at once
    C_np, c0_np, owner_np = spec_rows(spec, disjuncts)
    root_S = torch.zeros((1, st.n_hidden), dtype=torch.int8, device=net.device)
    lower, upper, _ = st.layers(root_S)
    out: dict = {}
    Cz, c0 = net.tensor(C_np), net.tensor(c0_np)
    lb, X, _, _ = crown.optimize_bound(net, lower, upper, Cz[None], c0[None], lo_in, hi_in, iters=root_iters,
                                       deadline=deadline, out=out)
    root_A, _ = st.compact(out.get("alphas", {}), {}, lower, upper, 1, C_np.shape[0])
    root_mu = None
    if cuts is not None and not bool(crown.proven(lb).all()):   # the root again, with the cuts (from α-CROWN's α)
        oc: dict = {}
        lbc = optimize_cut_bound(net, lower, upper, Cz[None], c0[None], lo_in, hi_in, cuts,
                                 iters=max(root_iters, CUT_ROOT_ITERS),
                                 alphas=out.get("alphas"), deadline=deadline, out=oc)
        res.info["root_lb_without_cuts"] = float(lb.min())
        lb, root_mu = torch.maximum(lb, lbc), oc["mu"]
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
    # disjuncts with the same number of rows share one search (their domains fill the same batches:
    # on a CPU a step's cost is mostly per call, not per domain); others go one at a time
    n_rows = {k: int((owner_np == k).sum()) for k in open_d}
    groups = [open_d] if joint and len(set(n_rows.values())) == 1 else [[k] for k in open_d]
    for n_done, grp in enumerate(groups):
        As = torch.stack([root_A[0, np.nonzero(owner_np == k)[0]] for k in grp])
        # the root's cut multipliers of these rows (cuts that joined an earlier group's search: computed anew)
        st.cut_mu = None if root_mu is None else torch.stack([root_mu[0, np.nonzero(owner_np == k)[0]] for k in grp])
        root_scores = [float(per[k]) for k in grp]
        try:
            status = _search_rows(st, spec, [disjuncts[k] for k in grp], check, As, deadline,
                                  (max_domains, max_store_bytes), batch, iters, candidates, res, (lr_alpha, lr_beta),
                                  root_scores=root_scores, screen=SCREEN if screen is None else screen,
                                  learn=clauses, cut_source=cut_source)
        except torch.cuda.OutOfMemoryError:
            _out_of_memory(res, "domains")
            status = "unknown"
        if status != "verified":
            res.status = status
            if status == "timeout":
                where = f"in disjunct {n_done + 1} of {len(open_d)}" if len(groups) > 1 else \
                    f"with {len(open_d)} disjunct(s) searched together"
                res.message = f"time limit hit {where} open after the root; " + res.message
                if np.isfinite(res.info.get("open_lb", -np.inf)):   # how far it got: the frontier against the root
                    root = min(root_scores)
                    res.info["root_open_lb"] = root
                    res.message += (f"; the worst open domain's margin bound is {res.info['open_lb']:.4g} "
                                    f"(root {root:.4g}; > 0 proves it)")
            break
    else:
        res.status, res.message = "verified", f"all {res.domains} domains proven ({len(open_d)} disjunct(s) " \
            "open after the root)"
    res.info.update(time=time.perf_counter() - t0, checked=check.checked)
    return res


class _PgdClock:
    """When the next PGD of a search is due: every ``PGD_EVERY`` s at first, each PGD that finds nothing
    stretching the interval by ``PGD_BACKOFF`` up to ``PGD_EVERY_MAX`` (a search that keeps proving
    rarely ends in a counterexample; at a fixed 2.5 s PGD took 12 % of OVAL21 deep img1052's search)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.every = PGD_EVERY

    def due(self) -> bool:
        return time.perf_counter() - self.last > self.every

    def ran(self) -> None:
        self.last = time.perf_counter()
        self.every = min(self.every * PGD_BACKOFF, PGD_EVERY_MAX)


def _search_counterexample(check, cand: np.ndarray, pgd: _PgdClock, deadline: float | None):
    """Re-check the open domains' candidate points (float64); failing that, PGD from the first 32 of
    them when ``pgd`` says it is due. Returns the counterexample or None."""
    x = check(cand)
    if x is None and pgd.due():
        left = np.inf if deadline is None else deadline - time.perf_counter()
        x = check.pgd(cand[:32], min(STEP_SECONDS, left))
        pgd.ran()
    return x


def _map_cut_state(f, x):
    """``f`` applied to every tensor of ``x = (mu, taus, sigmas)`` (``taus``, ``sigmas``: block → tensor)."""
    return f(x[0]), {j: f(t) for j, t in x[1].items()}, {j: f(t) for j, t in x[2].items()}


def _cast_moments(moments, f):
    """``(m, v, rows)`` of :func:`.cuts.optimize_cut_bound` with ``f`` applied to every tensor of ``m`` and ``v``."""
    return _map_cut_state(f, moments[0]), _map_cut_state(f, moments[1]), moments[2]


class _StateBudget:
    """The cut states of a search's stored domains, kept while they fit in what the stored domains (``per_domain``
    bytes each) leave of the store's bound ``limit``: cut states never end a search, they only stop being kept.
    ``store``: the search's key → ``(splits, A, B, disjunct, (generation, state) | None)``; ``width_of(gen)``: a
    state's width without its moments for the cuts of generation ``gen`` (``None``: the current ones). Where a child's state does not fit, the
    stored domains of higher bounds (searched later, if at all) give up theirs first: their moments, then their
    states."""

    def __init__(self, limit: int, per_domain: int, store: dict | None = None, width_of=None):
        self.limit, self.per_domain, self.held = limit, per_domain, 0
        self.store, self.width_of = store, width_of
        self.kept: list = []   # (−bound, key) of stored domains holding a state, highest bound first (some stale)

    def admit(self, n_domains: int, nbytes: int) -> bool:
        """Keep a state of ``nbytes`` beside ``n_domains`` stored domains? (Counted as held when it is.)"""
        if self.per_domain * n_domains + self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= nbytes

    def hold(self, n_domains: int, state: torch.Tensor, width: int) -> torch.Tensor | None:
        """What to keep of a packed cut ``state`` (m, ·) beside ``n_domains`` stored domains: all of it, else its
        first ``width`` columns (the state without its moments), else nothing; a copy (not a view that would keep
        its batch alive), counted as held."""
        for w in (state.shape[-1], width) if state.shape[-1] > width else (width,):
            if self.admit(n_domains, state.shape[0] * w * state.element_size()):
                return state[:, :w].clone()
        return None

    def keep(self, key: int, bound: float, n_domains: int, state: torch.Tensor) -> torch.Tensor | None:
        """:meth:`hold` of a state of the current cuts for the domain ``key`` of ``bound`` about to be stored, making
        room from stored domains of higher bounds where all of ``state`` does not fit; the domain then counts among
        those holding a state."""
        width = self.width_of(None)
        while True:
            held = self.hold(n_domains, state, width)
            if (held is not None and held.shape[-1] == state.shape[-1]) or not self.kept or -self.kept[0][0] <= bound:
                break
            if held is not None:
                self.release(held.numel() * held.element_size())
            self._strip(*heapq.heappop(self.kept))
        if held is not None:
            heapq.heappush(self.kept, (-bound, key))
        return held

    def _strip(self, neg_bound: float, key: int) -> None:
        it = self.store.get(key)
        if it is None or it[4] is None:   # gone, or stripped already
            return
        gen, W = it[4]
        self.release(W.numel() * W.element_size())
        w = self.width_of(gen)
        less = None
        if W.shape[-1] > w:   # its moments go, its state stays
            less = (gen, W[:, :w].clone())
            self.held += less[1].numel() * less[1].element_size()
            heapq.heappush(self.kept, (neg_bound, key))
        self.store[key] = (*it[:4], less)


def _search_rows(st: _ReluState, spec, disjuncts, check, root_A: torch.Tensor, deadline, limits, batch, iters,
                 candidates, res: BabResult, lrs=(0.1, 0.05), root_scores=None, screen: bool = False,
                 learn: bool = False, cut_source=None) -> str:
    """Best-first ReLU-split search on ``disjuncts`` (each with the same number ``m`` of rows; a
    domain belongs to one of them, and is safe when one of its disjunct's rows is proven > 0);
    ``root_A`` (G, m, n_slots) the root's α per disjunct; ``limits`` (max domains, max bytes) of
    the store. Updates ``res``, returns a status."""
    net = st.net
    Cs = torch.stack([net.tensor(spec_rows(spec, [d])[0]) for d in disjuncts])      # (G, m, n_out)
    c0s = torch.stack([net.tensor(spec_rows(spec, [d])[1]) for d in disjuncts])     # (G, m)
    m = Cs.shape[1]
    owner = torch.zeros((1, m), dtype=torch.long, device=net.device)   # all rows of a domain: its disjunct
    counter = itertools.count()
    heap: list = []
    store: dict[int, tuple] = {}

    per_domain = st.n_hidden + 2 * 4 * m * st.n_slots + 200     # int8 splits, float32 α and β, bookkeeping
    max_domains = max(1, min(limits[0], limits[1] // per_domain))
    budget = _StateBudget(limits[1], per_domain, store, st.cut_state_width)

    def push(S, A, B, tags, scores, W=None):
        # a domain: its splits, α, β, disjunct and (with cuts) its cut state, of the cuts' generation it holds
        # for, within the store's memory bound (_StateBudget; a child without one starts from the root's μ)
        for r in range(S.shape[0]):
            k = next(counter)
            held = None if W is None else budget.keep(k, float(scores[r]), len(store) + 1, W[r])
            store[k] = (S[r], A[r], B[r], int(tags[r]), None if held is None else (st.cut_gen, held))
            heapq.heappush(heap, (float(scores[r]), k))

    def pop(k):
        it = store.pop(k)
        if it[4] is not None:
            budget.release(it[4][1].numel() * it[4][1].element_size())
        return it

    G = len(disjuncts)
    roots = torch.arange(G)
    if st.cuts is not None and st.cut_mu is None:   # cuts that joined an earlier group's search
        roots = torch.nonzero(~_adopt_cuts(st, st.cuts, root_A, Cs, c0s, deadline, res).cpu())[:, 0]
    scores = torch.full((G,), -np.inf) if root_scores is None else torch.tensor(root_scores, dtype=torch.float64)
    A0 = root_A[roots.to(root_A.device)]
    push(torch.zeros((roots.numel(), st.n_hidden), dtype=torch.int8, device=net.device), A0, torch.zeros_like(A0),
         roots.tolist(), scores[roots])
    batcher = _Batcher(batch)
    exhausted = 0          # domains with nothing left to split but not proven (need an exact solve)
    pgd = _PgdClock()
    lo1, hi1 = st.lo_in, st.hi_in
    book = ConflictClauses(int(st.split_idx.numel()), net.device) if learn else None
    if book is not None:
        res.info["clauses"] = book.stats
    t_start = t_log = time.perf_counter()

    while heap:
        if _log.isEnabledFor(logging.DEBUG) and time.perf_counter() - t_log >= LOG_EVERY:
            t_log = time.perf_counter()
            _log.debug("relu_bab %.0f s: frontier %.5g, %d open, %d domains, cut states %.0f MB", t_log - t_start,
                       heap[0][0], len(heap), res.domains, budget.held / 2 ** 20)
        if cut_source is not None and cut_source.due():
            frontier: dict = {}
            for score, k in heap:
                g = store[k][3]
                frontier[disjuncts[g]] = min(frontier.get(disjuncts[g], np.inf), score)
            new = cut_source(frontier)
            if new is not None:
                proven = _adopt_cuts(st, new, root_A, Cs, c0s, deadline, res)
                if bool(proven.any()):   # disjuncts the cuts prove at the root: their domains are done
                    done = proven.tolist()
                    for k in [k for k, it in store.items() if done[it[3]]]:
                        pop(k)
                    heap = [e for e in heap if e[1] in store]
                    heapq.heapify(heap)
                    if not heap:
                        break
        if deadline is not None and time.perf_counter() >= deadline:
            res.message = f"{len(heap)} open domains"
            res.info["open_lb"] = heap[0][0]
            return "timeout"
        if len(store) > max_domains:
            res.message = f"domain limit of {max_domains} reached (memory bound)"
            return "unknown"
        ts = time.perf_counter()
        take = [heapq.heappop(heap) for _ in range(batcher.take(len(heap), deadline))]
        items = [pop(k) for _, k in take]
        S = torch.stack([it[0] for it in items])
        A = torch.stack([it[1] for it in items])
        B = torch.stack([it[2] for it in items])
        tags = torch.tensor([it[3] for it in items], dtype=torch.long, device=net.device)
        parent = torch.tensor([sc for sc, _ in take], dtype=net.dtype, device=net.device)   # the parents' scores
        # the parents' cut states where they hold for the current cuts (a list: most batches mix in none)
        states = [st.current_state(it[4]) for it in items]
        pidx = torch.arange(len(items))       # each row's place in ``items`` through the filters below
        if book is not None:   # clauses learned since these domains were stored
            lits, gone = book.propagate(S[:, st.split_idx], tags)
            S[:, st.split_idx] = lits      # (S is this batch's own stack)
            if bool(gone.any()):
                keep = torch.nonzero(~gone)[:, 0]
                S, A, B, tags, parent = S[keep], A[keep], B[keep], tags[keep], parent[keep]
                pidx = pidx[keep.cpu()]
                if S.shape[0] == 0:
                    continue
        P = S.shape[0]
        with torch.no_grad():
            lower, upper, splits = st.layers(S)
            alphas, betas = st.expand(A, B)
            nus: dict = {}
            has_split = bool((S != 0).any())
            lbp = crown.backward_bound(net, lower, upper, Cs[tags], c0s[tags], lo1.expand(P, -1), hi1.expand(P, -1),
                                       alphas=alphas, betas=betas if has_split else None,
                                       splits=splits if has_split else None, record=nus, want_x=False)[0]
            sc = st.scores(lower, upper, nus, lbp.argmin(dim=1))
            sc = torch.where(S != 0, torch.full_like(sc, -1.0), sc)
        k = max(1, min(candidates, st.n_hidden))
        top_v, top_i = sc.topk(k, dim=1)
        ok = top_v[:, 0] >= 0
        if not bool(ok.all()):
            exhausted += int((~ok).sum())
            keep = torch.nonzero(ok)[:, 0]
            S, A, B, tags, top_v, top_i = S[keep], A[keep], B[keep], tags[keep], top_v[keep], top_i[keep]
            parent = parent[keep]
            pidx = pidx[keep.cpu()]
            lower, upper = [t[keep] for t in lower], [t[keep] for t in upper]
            alphas = {j: t[keep] for j, t in alphas.items()}
            betas = {j: t[keep] for j, t in betas.items()}
            P = S.shape[0]
            if P == 0:
                continue
        ar = torch.arange(P, device=net.device)
        fsb_lb = None
        if k > 1 or screen:
            with torch.no_grad():
                best_k, fsb_lb = _filtered_choice(st, S, lower, upper, alphas, betas, top_v, top_i, Cs[tags],
                                                  c0s[tags], owner)
            chosen = top_i[ar, best_k]
        else:
            chosen = top_i[:, 0]
        children = S.repeat(2, 1)
        children[ar, chosen] = 1
        children[ar + P, chosen] = -1
        cA, cB, ctags = A.repeat(2, 1, 1), B.repeat(2, 1, 1), tags.repeat(2)
        by_clause = torch.zeros(2 * P, dtype=torch.bool, device=net.device)
        if book is not None:   # implied splits only shrink a child: the screening bound stays sound
            lits, by_clause = book.propagate(children[:, st.split_idx], ctags)
            children[:, st.split_idx] = lits
        todo = torch.nonzero(~by_clause)[:, 0]
        lb_all = torch.full((2 * P, m), torch.inf, dtype=net.dtype, device=net.device)
        if fsb_lb is not None:   # children the parent's α/β already prove need no optimization
            lb_all = torch.where(by_clause[:, None], lb_all, fsb_lb)
            todo = torch.nonzero(~_domain_safe(fsb_lb, owner, 1) & ~by_clause)[:, 0]
            res.info["screened"] = res.info.get("screened", 0) + 2 * P - todo.numel() - int(by_clause.sum())
        X = None
        cW = None
        if todo.numel():
            lb_all = lb_all.clone()
            X, cW = _bound_children(st, children, cA, cB, ctags, todo, states, pidx, Cs, c0s, iters, deadline, lrs,
                                    lb_all, fsb_lb is not None)
        res.domains += 2 * P
        res.steps += 1
        safe = _domain_safe(lb_all, owner, 1)
        if book is not None:
            with torch.no_grad():
                _learn(st, book, children, cA, cB, ctags, lb_all, safe & ~by_clause, Cs, c0s, owner)
        open_idx = torch.nonzero(~safe)[:, 0]
        if open_idx.numel():
            # candidates for the float64 re-check: the optimized children's bound minimizers
            pos = torch.full((2 * P,), -1, dtype=torch.long, device=net.device)
            pos[todo] = torch.arange(todo.numel(), device=net.device)
            po = pos[open_idx]
            if X is not None and bool((po >= 0).any()):
                sel = po[po >= 0]
                worst = lb_all[open_idx[po >= 0]].argmin(dim=1)
                cand = X[sel, worst].cpu().numpy()
                x = _search_counterexample(check, cand, pgd, deadline)
                if x is not None:
                    res.counterexample = x
                    res.message = f"counterexample from an open domain after {res.domains} domains"
                    return "falsified"
            push(children[open_idx], cA[open_idx], cB[open_idx], ctags[open_idx],
                 # a parent's bound holds on its children: order them by the better of the two
                 torch.maximum(lb_all[open_idx].max(dim=1).values, parent.repeat(2)[open_idx]),
                 None if cW is None else cW[open_idx])
        res.max_queue = max(res.max_queue, len(heap))
        batcher.update(P, time.perf_counter() - ts)
    if exhausted:
        res.message = f"{exhausted} fully split domain(s) left unproven (the bound is not exact there)"
        return "unknown"
    return "verified"


def _bound_children(st: _ReluState, children, cA, cB, ctags, todo, states, pidx, Cs, c0s, iters, deadline, lrs,
                    lb_all, screened: bool):
    """Optimize the children ``todo`` (indices into the 2P ``children``; child ``r``'s parent is row ``r mod P``,
    ``items[pidx[r mod P]]``) in place: their bounds into ``lb_all`` (the larger with the screening bound when
    ``screened``), their α/β into ``cA, cB``. With cuts, children whose parent has a cut state (``states``, by
    item) start from it with :data:`CUT_CHILD_LRS`, the others from the root's μ with ``lrs``; returns the
    bound minimizers ``X`` (|todo|, m, n_0) and the cut states of all 2P children ((2P, m, ·), ``None`` without
    cuts; rows not in ``todo`` are zero)."""
    net = st.net
    P = pidx.numel()
    m = Cs.shape[1]
    has = torch.tensor([states[int(pidx[int(r) % P])] is not None for r in todo.tolist()], dtype=torch.bool,
                       device=todo.device)   # (all False without cuts)
    X = None
    cW = None if st.cuts is None else torch.zeros(
        (children.shape[0], m, (3 if CUT_MOMENTS else 1) * st.cut_state_width()), dtype=CUT_STATE_DTYPE,
        device=net.device)
    for idx, inherit in ((todo[~has], False), (todo[has], True)):
        if not idx.numel():
            continue
        D = idx.numel()
        lower_c, upper_c, splits_c = st.layers(children[idx])
        al_c, be_c = st.expand(cA[idx], cB[idx])
        out: dict = {}
        kw = {}
        if inherit:
            held = [states[int(pidx[int(r) % P])] for r in idx.tolist()]
            w = st.cut_state_width()
            rows = torch.tensor([h.shape[-1] > w for h in held], dtype=torch.bool, device=net.device)
            if bool(rows.any()):   # parents kept with their moments (the others padded: theirs start at zero)
                held = [h if h.shape[-1] > w else torch.cat([h, h.new_zeros(h.shape[0], 2 * w)], -1) for h in held]
                kw["moment_rows"] = rows
            kw["state"] = torch.stack(held)
            rates = CUT_CHILD_LRS
        else:
            kw["mu"] = None if st.cut_mu is None else st.cut_mu[ctags[idx]]
            rates = lrs
        lb, Xp = st.optimize(lower_c, upper_c, Cs[ctags[idx]], c0s[ctags[idx]], splits_c, al_c, be_c, iters,
                             deadline, out, rates, **kw)
        lb_all[idx] = torch.maximum(lb_all[idx], lb) if screened else lb
        nA, nB = st.compact(out.get("alphas", {}), out.get("betas", {}), lower_c, upper_c, D, m)
        cA[idx], cB[idx] = nA, nB
        if cW is not None:
            cW[idx] = out["cut_state"]
        if X is None:
            X = torch.empty((children.shape[0], *Xp.shape[1:]), dtype=Xp.dtype, device=Xp.device)
        X[idx] = Xp
    return X[todo], cW


def _on_net(cuts, net: TorchNet) -> Cuts:
    """``cuts`` as :class:`.cuts.Cuts` on ``net`` (a MILP's :class:`solvers.milp_cuts.RootCuts` is mapped from its
    columns)."""
    return cuts if isinstance(cuts, Cuts) else cuts_from_columns(cuts.model, cuts.coef, cuts.rhs, net)


def _adopt_cuts(st: _ReluState, cuts, root_A: torch.Tensor, Cs, c0s, deadline, res: BabResult) -> torch.Tensor:
    """Cuts joining a running search: they replace ``st.cuts``; the root's multipliers (every child's start) are
    optimized with them (``CUT_ROOT_ITERS`` steps from the root's α ``root_A`` (G, m, n_slots), rows ``Cs, c0s``
    (G, m, ·)). Returns which of the G disjuncts the cuts prove at the root ((G,) bool)."""
    net = st.net
    cuts = _on_net(cuts, net)
    G = Cs.shape[0]
    lower, upper, _ = st.layers(torch.zeros((G, st.n_hidden), dtype=torch.int8, device=net.device))
    alphas, _ = st.expand(root_A, torch.zeros_like(root_A))
    out: dict = {}
    lb = optimize_cut_bound(net, lower, upper, Cs, c0s, st.lo_in.expand(G, -1), st.hi_in.expand(G, -1), cuts,
                            iters=CUT_ROOT_ITERS, alphas=alphas, deadline=deadline, out=out)
    st.set_cuts(cuts, out["mu"])
    owner = torch.zeros((1, Cs.shape[1]), dtype=torch.long, device=net.device)
    proven = _domain_safe(lb, owner, 1)
    res.info.setdefault("cuts_joined", []).append(
        {"domains": res.domains, "cuts": cuts.K, "root_lb": float(lb.min()), "proven": int(proven.sum())})
    return proven


def _learn(st: _ReluState, book: ConflictClauses, S, A, B, tags, lb, proven, Cs, c0s, owner) -> None:
    """Clauses from the proven domains ``S[proven]`` (α/β ``A, B`` compact, bounds ``lb``). A split's
    share of the proof is estimated from one backward pass: ``|ν_i|·(−u_i l_i)/(u_i − l_i)`` (what the
    bound would lose to neuron ``i``'s triangle relaxation, ``ν`` its coefficient on the best row, root
    bounds) plus ``|β_i|·max(−l_i, u_i)``; shorter literal sets drop the ``LEARN_DROP`` shares of the
    least important literals, each is bounded again with the same α/β (one backward pass), and the
    shortest one the bound proves becomes a clause (a proof of those literals alone, from the root's
    bounds)."""
    idx = torch.nonzero(proven)[:, 0]
    if not idx.numel():
        return
    net = st.net
    lits = S[idx][:, st.split_idx]
    n_full = (lits != 0).sum(1)
    idx, lits, n_full = idx[n_full >= 2], lits[n_full >= 2], n_full[n_full >= 2]
    R = idx.numel()
    if not R:
        return
    t = tags[idx]
    lo, hi = st.lo_in.expand(R, -1), st.hi_in.expand(R, -1)
    alphas, betas = st.expand(A[idx], B[idx])
    lower, upper, splits = st.layers(S[idx])
    nus: dict = {}
    crown.backward_bound(net, lower, upper, Cs[t], c0s[t], lo, hi, alphas=alphas, betas=betas, splits=splits,
                         record=nus, want_x=False)
    ar = torch.arange(R, device=net.device)
    best = lb[idx].argmax(dim=1)
    nu = torch.cat([nus[j][ar, best][:, st.root_unstable[j]] for j in range(st.L - 1) if net.is_relu(j)], dim=1)
    beta = B[idx, best][:, st.split_slot].abs().to(net.dtype)
    l, u = st.split_lower, st.split_upper
    est = nu.abs() * (-l * u / (u - l)) + beta * torch.maximum(-l, u)
    est = torch.where(lits != 0, est, torch.full_like(est, torch.inf))
    order = torch.argsort(est, dim=1)                                  # least important literal first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=net.device).expand(R, -1))
    short = torch.cat([torch.where(rank < (f * n_full).floor().long()[:, None], torch.zeros_like(lits), lits)
                       for f in LEARN_DROP])
    who = ar.repeat(len(LEARN_DROP))
    n_short = (short != 0).sum(1)
    live = (n_short > 0) & (n_short < n_full[who])
    short, who, n_short = short[live], who[live], n_short[live]
    K = who.numel()
    if not K:
        return
    Sr = torch.zeros((K, st.n_hidden), dtype=S.dtype, device=S.device)
    Sr[:, st.split_idx] = short
    lower, upper, splits = st.layers(Sr)
    lbr = crown.backward_bound(net, lower, upper, Cs[t[who]], c0s[t[who]], st.lo_in.expand(K, -1),
                               st.hi_in.expand(K, -1), alphas={j: v[who] for j, v in alphas.items()},
                               betas={j: v[who] for j, v in betas.items()}, splits=splits, want_x=False)[0]
    ok = _domain_safe(lbr, owner, 1)
    book.stats["tried"] = book.stats.get("tried", 0) + K
    if not bool(ok.any()):
        return
    # per domain the shortest proven set (candidates of one domain are nested)
    size = torch.where(ok, n_short, torch.full_like(n_short, 1 << 30))
    first = torch.full((R,), 1 << 30, dtype=size.dtype, device=net.device).scatter_reduce(0, who, size, reduce="amin")
    pick = ok & (size == first[who])
    book.add(short[pick], t[who[pick]])


def _filtered_choice(st: _ReluState, S, lower, upper, alphas, betas, top_v, top_i, Cp, c0p, owner):
    """Filtered smart branching: bound both children of each of the ``k`` candidate neurons
    ``top_i`` (P, k) with the parent's α/β (one backward pass, no optimization; a sound bound of the
    child). ``Cp`` (P, m, n_out), ``c0p`` (P, m): each parent's rows. Returns the chosen candidate's
    position (P,) — the one whose better child bound is highest (measured: fewer domains than the
    worse child's on MNIST 256x4), the first (best intercept score) on ties — and the chosen
    children's bounds (2P, m): rows ``0…P−1`` the active children, ``P…2P−1`` the inactive ones."""
    net = st.net
    P, k = top_i.shape
    m = Cp.shape[1]
    R = 2 * k * P                       # child r: parent r // (2k), candidate (r // 2) % k, side r % 2
    par = torch.arange(P, device=net.device).repeat_interleave(2 * k)
    cand = top_i.repeat_interleave(2, dim=1).reshape(-1)
    side = torch.tensor([1, -1], dtype=torch.int8, device=net.device).repeat(k * P)
    Sc = S[par].clone()
    Sc[torch.arange(R, device=net.device), cand] = side
    lower_c, upper_c, splits_c = [], [], {}
    for j in range(st.L - 1):
        s = Sc[:, st.offsets[j]:st.offsets[j + 1]].to(net.dtype)
        l, u = crown.apply_splits(lower[j][par], upper[j][par], s)
        lower_c.append(l)
        upper_c.append(u)
        splits_c[j] = s
    al = {j: t[par] for j, t in alphas.items()}
    be = {j: t[par] for j, t in betas.items()}
    lb = crown.backward_bound(net, lower_c, upper_c, Cp[par], c0p[par], st.lo_in.expand(R, -1),
                              st.hi_in.expand(R, -1), alphas=al, betas=be, splits=splits_c, want_x=False)[0]
    score = _disjunct_scores(lb, owner, 1)[:, 0].reshape(P, k, 2).max(dim=2).values
    score = torch.where(top_v >= 0, score, torch.full_like(score, -torch.inf))
    best = score.argmax(dim=1)
    lbk = lb.reshape(P, k, 2, m)
    ar = torch.arange(P, device=net.device)
    chosen = lbk[ar, best]               # (P, 2, m)
    return best, torch.cat([chosen[:, 0], chosen[:, 1]], dim=0)


# ------------------------------------------------------------------------------------ input splitting
def input_bab(network, spec: Spec, blocks, disjuncts, *, deadline: float | None, device="cpu", seed: int = 0,
              max_domains: int | None = None, batch: int = 256) -> BabResult:
    """Branch and bound over the input box (networks with few inputs; box regions only); at most
    ``max_domains`` pending boxes (default: :func:`store_limits` of the device)."""
    t0 = time.perf_counter()
    net = TorchNet.from_blocks(blocks, device)
    max_domains = store_limits(net.device, max_domains, None)[0]
    res = BabResult("unknown")
    try:
        _input_search(network, spec, net, disjuncts, deadline, seed, max_domains, batch, res)
    except torch.cuda.OutOfMemoryError:
        _out_of_memory(res, "boxes")
    res.info["time"] = time.perf_counter() - t0
    return res


def _input_search(network, spec: Spec, net: TorchNet, disjuncts, deadline, seed, max_domains, batch,
                  res: BabResult) -> None:
    C_np, c0_np, owner_np = spec_rows(spec, disjuncts)
    n_disj = len(disjuncts)
    owner = torch.as_tensor(owner_np, device=net.device)[None, :]
    Cz, c0 = net.tensor(C_np), net.tensor(c0_np)
    check = _Checker(network, spec, seed)

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
    pgd = _PgdClock()
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
                x = _search_counterexample(check, cand, pgd, deadline)
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
    res.info.update(batch=batcher.size, checked=check.checked)
