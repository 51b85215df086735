"""Intermediate bounds refined by branch and bound (a batched stand-in for α,β-CROWN's MIP refinement).

α-CROWN intermediate bounds are about as tight as per-neuron LPs, and on MNIST 256x4 the exact
(MILP) bounds of the second hidden layer are about a third narrower (prop_0 ε 0.05: α-CROWN
``[−8.59, 7.52]``, MILP ``[−5.26, ≤5.88]`` on its most ambiguous neuron), but HiGHS needs 12–20 s per
neuron and direction there. This module gets most of that gap with the β-CROWN machinery of
:mod:`.bab` instead: for a hidden block ``i``, each bound of each unstable neuron (``min z_k`` and
``min −z_k``: one "row") is the root of its own best-first ReLU-split search over the blocks
``< i``; all rows advance together in batches (each step splits every open row's ``per_row`` worst
leaves), every child is bounded by α/β-CROWN warm-started from its parent (:meth:`_ReluState.optimize`:
float32 steps, float64 evaluation). A row's bound is the minimum over its leaves (the leaves cover the
input box), never below the bound it started from; a row stops once it proves the neuron stable.

Blocks are refined first to last (each refined block tightens the α-CROWN bounds of the later ones,
re-run after it); the time box is shared among the blocks in proportion to their unstable neurons.
The last hidden block feeds the output directly: while it is refined, the caller's ``stop`` sees its
bounds so far every ``check_every`` seconds (the verifier ends there once they prove the query, or
once a short branch and bound on them does).

Soundness: a leaf's bound holds on its sub-domain for any α ∈ [0, 1], β ≥ 0 (evaluated in float64),
the parent's bound holds on each child, the leaves of a row partition its box, so the minimum over
them holds on the box; the result is loosened by :func:`crown.slack` like every torch bound, and
intersected with the bounds it started from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mipprune.verification import crown
from mipprune.verification.bab import _ReluState
from mipprune.verification.crown import TorchNet

__all__ = ["split_refine_bounds", "SplitRefineInfo"]

MAX_LEAVES = 200_000   # all rows' leaves together (memory bound: int8 splits + float32 α/β per leaf)
STALL_WINDOW = 10.0    # seconds over which a block's progress is measured (``stall``)
ITERS = 2              # α/β Adam steps per child: few and cheap beat many (more leaves; session 13)
FOCUS = "last"         # blocks whose rows are weighed by the property (with ``objective``)
MAX_QUOTA = 64         # most leaves of one row split in one step (weighted rows)
WEIGHT_FLOOR = 0.02    # a row's weight is at least this share of the heaviest's (every row advances)


def _floored(w: torch.Tensor) -> torch.Tensor:
    """Row weights (float64) with the floor applied; all equal when none is positive."""
    w = w.to(torch.float64).clamp(min=0)
    top = float(w.max()) if w.numel() else 0.0
    return torch.ones_like(w) if top <= 0 else torch.clamp(w, min=WEIGHT_FLOOR * top)


def _quotas(credit: torch.Tensor, weight: torch.Tensor, live: torch.Tensor, per_row: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's leaves per row (R,) long, and the credit carried over: the live rows share
    ``per_row`` leaves per live row in proportion to ``weight``; each row's fractional share accrues as
    credit, so over many steps a row's leaves follow its weight however small (a dead row's credit is
    dropped). At most :data:`MAX_QUOTA` per row and step."""
    w = torch.where(live, weight, torch.zeros_like(weight))
    credit = torch.where(live, credit + per_row * int(live.sum()) * w / w.sum().clamp(min=1e-300),
                         torch.zeros_like(credit))
    quota = credit.floor().clamp(max=MAX_QUOTA)
    return quota.long(), (credit - quota).clamp(max=MAX_QUOTA)


def _spec_weights(net: TorchNet, i: int, lower: list, upper: list, C: torch.Tensor, c0: torch.Tensor, lo, hi):
    """``weigh(l, u, idx)`` for block ``i``: how much each bound row of the unstable neurons ``idx`` matters
    to the property's margins ``C z_L + c0``. The CROWN bound of the margins loses ``−ν_j^− · t_j`` to
    neuron ``j``'s upper relaxation (``ν_j`` its back-substituted coefficient, summed over the margins not
    yet proven, ``t_j = −u_j l_j / (u_j − l_j)`` the triangle's intercept); raising ``l_j`` shrinks ``t_j``
    at the rate ``u_j² / (u_j − l_j)²``, lowering ``u_j`` at ``l_j² / (u_j − l_j)²``: a row's weight is
    that rate times ``ν_j^−`` (first order; the block's effect on later blocks' bounds is not counted)."""
    def weigh(l, u, idx):
        tl, tu = list(lower), list(upper)
        tl[i], tu[i] = torch.minimum(l, u), u
        nus: dict = {}
        with torch.no_grad():
            lb, _, _ = crown.backward_bound(net, tl, tu, C[None], c0[None], lo, hi, record=nus, want_x=False)
        open_ = (lb[0] <= 0).to(C.dtype)
        if not bool(open_.any()):
            open_ = torch.ones_like(open_)
        nu = (nus[i][0].clamp(max=0).neg() * open_[:, None]).sum(0)[idx]
        li, ui = l[0, idx], u[0, idx]
        den = (ui - li).clamp(min=1e-12) ** 2
        unstable = (li < 0) & (ui > 0)
        w = torch.cat([nu * ui.clamp(min=0) ** 2 / den, nu * li.clamp(max=0) ** 2 / den])
        return torch.where(torch.cat([unstable, unstable]), w, torch.zeros_like(w))
    return weigh


@dataclass
class SplitRefineInfo:
    """What a refinement did, per refined block: ``rows`` (two per unstable neuron), ``steps``,
    ``leaves`` bounded, ``unstable_before`` / ``unstable_after`` and the summed width of the unstable
    neurons' intervals before / after; ``time`` seconds in all."""

    blocks: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    leaves: list = field(default_factory=list)
    unstable_before: list = field(default_factory=list)
    unstable_after: list = field(default_factory=list)
    width_before: list = field(default_factory=list)
    width_after: list = field(default_factory=list)
    block_time: list = field(default_factory=list)   # seconds of each refined block's split search …
    rerun_time: list = field(default_factory=list)   # … and of the α-CROWN re-run of the later blocks after it
    time: float = 0.0
    stopped: bool = False   # ended early by ``stop`` (the bounds proved what the caller needed)

    def summary(self) -> str:
        parts = [f"block {b}: {ub}→{ua} unstable, width {wb:.0f}→{wa:.0f} ({lv} leaves, {bt:.0f} s"
                 + (f" + α re-run {rt:.0f} s)" if rt else ")")
                 for b, ub, ua, wb, wa, lv, bt, rt in zip(self.blocks, self.unstable_before, self.unstable_after,
                                                          self.width_before, self.width_after, self.leaves,
                                                          self.block_time, self.rerun_time)]
        return f"split-refined intermediate bounds in {self.time:.1f} s: " + "; ".join(parts)


def _truncated(net: TorchNet, i: int) -> TorchNet:
    """The network up to block ``i`` (its pre-activation is the "output")."""
    return TorchNet(net.W[:i + 1], net.b[:i + 1], net.device, net.dtype, net.skips[:i + 1], net.pool[:i + 1],
                    net.sparse[:i + 1])


def _tightened(lo: torch.Tensor, hi: torch.Tensor, l: torch.Tensor, u: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds ``(lo, hi)`` intersected with a search's ``(l, u)`` loosened against round-off: never
    looser than either, the lower never above the upper."""
    l, u = crown._loosen(l, u)
    hi = torch.minimum(hi, u)
    return torch.minimum(torch.maximum(lo, l), hi), hi


def _refine_block(net: TorchNet, i: int, lower: list, upper: list, lo, hi, deadline: float | None, iters: int,
                  per_row: int, max_leaves: int, check=None, check_every: float = 2.0, weigh=None,
                  stall: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Best-first split search on every bound of block ``i``'s unstable neurons; returns the new
    ``(l, u)`` of block ``i`` (1, n_i) (not loosened yet), the number of steps and of leaves bounded.
    ``check(l, u)``, when given, is called with the bounds so far (as returned, every ``check_every``
    seconds); ``True`` ends the search. ``weigh(l, u, idx)``, when given, returns each row's weight (2k,)
    (rows ``min z_idx`` then ``min −z_idx``), re-read every ``check_every`` seconds: each step splits
    ``per_row`` leaves per open row on average, shared among the rows in proportion to their weights
    (a credit per row, so that a light row still advances now and then); without it every open row
    gets ``per_row``. ``stall``, when given: the search ends once the block's unstable intervals have
    shrunk by less than this fraction of their starting summed width over the last :data:`STALL_WINDOW`
    seconds (the rest of its time goes to the later blocks)."""
    neti = _truncated(net, i)
    st = _ReluState(neti, lower[:i], upper[:i], lo, hi, intermediate=False, fast32=net.dtype == torch.float64)
    l, u = lower[i][0].clone(), upper[i][0].clone()
    idx = torch.nonzero((l < 0) & (u > 0))[:, 0]
    k, n = idx.numel(), l.numel()
    if not k or not st.n_slots:
        return l[None], u[None], 0, 0
    R = 2 * k
    C = torch.zeros(R, 1, n, dtype=net.dtype, device=net.device)
    C[torch.arange(k), 0, idx] = 1.0           # row r < k: min z_idx[r]
    C[torch.arange(k, R), 0, idx] = -1.0       # row r >= k: min −z_idx[r−k]
    c0 = torch.zeros(R, 1, dtype=net.dtype, device=net.device)
    start = torch.cat([l[idx], -u[idx]])       # each row's bound so far
    # leaves: splits, warm-start α/β, row, bound; "final" leaves have nothing left to split
    S = torch.zeros(R, st.n_hidden, dtype=torch.int8, device=net.device)
    low0, up0, _ = st.layers(S[:1])
    A0, _ = st.compact({}, {}, low0, up0, 1, 1)
    A = A0.expand(R, -1, -1).clone()
    B = torch.zeros_like(A)
    row = torch.arange(R, device=net.device)
    lb = start.clone()
    final = torch.zeros(R, dtype=torch.bool, device=net.device)
    steps = bounded = 0
    ar_rows = torch.arange(R, device=net.device)
    next_check = time.perf_counter() + check_every
    credit = torch.zeros(R, dtype=torch.float64, device=net.device)
    weight = None if weigh is None else _floored(weigh(l[None], u[None], idx))
    width0 = float((u[idx] - l[idx]).sum())
    mark_t, mark_v = time.perf_counter(), float(start.sum())   # Σ row bounds = −(summed width)

    def current(row_lb):
        row_lb = torch.maximum(row_lb, start)
        lc, uc = l.clone(), u.clone()
        lc[idx], uc[idx] = row_lb[:k], -row_lb[k:]
        return lc[None], uc[None]

    while True:
        if deadline is not None and time.perf_counter() >= deadline:
            break
        # each row's bound: the minimum over its leaves (they partition the box at this point);
        # rows proven stable (bound > 0) are done
        row_lb = torch.full((R,), torch.inf, dtype=lb.dtype, device=lb.device).scatter_reduce(0, row, lb, "amin")
        if (check is not None or weigh is not None) and time.perf_counter() >= next_check:
            if check is not None and check(*current(row_lb)):
                break
            if weigh is not None:
                weight = _floored(weigh(*current(row_lb), idx))
            next_check = time.perf_counter() + check_every
        if stall is not None and time.perf_counter() - mark_t >= STALL_WINDOW:
            v = float(torch.maximum(row_lb, start).sum())
            if v - mark_v < stall * width0:
                break   # stalled: the later blocks get the rest of the time
            mark_t, mark_v = time.perf_counter(), v
        open_row = ~crown.proven(row_lb)
        # candidates: non-final leaves of open rows, the ``per_row`` worst of each row
        cand = open_row[row] & ~final
        if not bool(cand.any()) or lb.numel() > max_leaves:
            break
        ci = torch.nonzero(cand)[:, 0]
        order = ci[torch.argsort(lb[ci], stable=True)]
        order = order[torch.argsort(row[order], stable=True)]     # by row, worst first within a row
        r_sorted = row[order]
        first = torch.searchsorted(r_sorted, ar_rows)              # start of each row's run
        rank = torch.arange(order.numel(), device=net.device) - first[r_sorted]
        # a row whose worst leaf is final cannot improve: skip it (its bound is that leaf's)
        worst_final = final & (lb <= row_lb[row])
        stuck = torch.zeros(R, dtype=torch.bool, device=net.device).scatter_(0, row[worst_final], True)
        if weigh is None:
            quota = torch.full((R,), per_row, dtype=torch.long, device=net.device)
        else:
            live = open_row & ~stuck & torch.zeros(R, dtype=torch.bool, device=net.device).scatter_(0, row[cand], True)
            quota, credit = _quotas(credit, weight, live, per_row)
        pick = order[(rank < quota[r_sorted]) & ~stuck[r_sorted]]
        if not pick.numel():   # (weighted: some live row always has a whole leaf of credit)
            break
        keep = torch.ones(lb.numel(), dtype=torch.bool, device=net.device)
        keep[pick] = False
        pS, pA, pB, prow, plb = S[pick], A[pick], B[pick], row[pick], lb[pick]
        S, A, B, row, lb, final = S[keep], A[keep], B[keep], row[keep], lb[keep], final[keep]
        P = pick.numel()
        with torch.no_grad():
            lw, up, sp = st.layers(pS)
            al, be = st.expand(pA, pB)
            nus: dict = {}
            has_split = bool((pS != 0).any())
            crown.backward_bound(neti, lw, up, C[prow], c0[prow], lo.expand(P, -1), hi.expand(P, -1), alphas=al,
                                 betas=be if has_split else None, splits=sp if has_split else None, record=nus,
                                 want_x=False)
            sc = st.scores(lw, up, nus, torch.zeros(P, dtype=torch.long, device=net.device))
            sc = torch.where(pS != 0, torch.full_like(sc, -1.0), sc)
        top_v, chosen = sc.max(dim=1)
        done = top_v < 0                       # every unstable neuron below is split: keep as final
        if bool(done.any()):
            S, A, B = torch.cat([S, pS[done]]), torch.cat([A, pA[done]]), torch.cat([B, pB[done]])
            row, lb = torch.cat([row, prow[done]]), torch.cat([lb, plb[done]])
            final = torch.cat([final, torch.ones(int(done.sum()), dtype=torch.bool, device=net.device)])
            live = ~done
            pS, pA, pB, prow, plb, chosen = pS[live], pA[live], pB[live], prow[live], plb[live], chosen[live]
            P = pS.shape[0]
            if not P:
                continue
        ar = torch.arange(P, device=net.device)
        kids = pS.repeat(2, 1)
        kids[ar, chosen] = 1
        kids[ar + P, chosen] = -1
        kA, kB, krow, klb = pA.repeat(2, 1, 1), pB.repeat(2, 1, 1), prow.repeat(2), plb.repeat(2)
        lw, up, sp = st.layers(kids)
        al, be = st.expand(kA, kB)
        out: dict = {}
        new_lb, _ = st.optimize(lw, up, C[krow], c0[krow], sp, al, be, iters, deadline, out, (0.1, 0.05))
        # a child is part of its parent's domain: the parent's bound holds on it too
        new_lb = torch.maximum(new_lb[:, 0], klb)
        nA, nB = st.compact(out.get("alphas", {}), out.get("betas", {}), lw, up, 2 * P, 1)
        S, A, B = torch.cat([S, kids]), torch.cat([A, nA]), torch.cat([B, nB])
        row, lb = torch.cat([row, krow]), torch.cat([lb, new_lb])
        final = torch.cat([final, torch.zeros(2 * P, dtype=torch.bool, device=net.device)])
        steps += 1
        bounded += 2 * P
    row_lb = torch.full((R,), torch.inf, dtype=lb.dtype, device=lb.device).scatter_reduce(0, row, lb, "amin")
    lc, uc = current(row_lb)
    return lc, uc, steps, bounded


def split_refine_bounds(blocks, lower, upper, box_lower, box_upper, *, time_limit: float | None = None,
                        device="cpu", layers=None, iters: int | None = None, per_row: int = 2, alpha_iters: int = 30,
                        max_leaves: int = MAX_LEAVES, stop=None, check_every: float = 2.0,
                        objective=None, focus: str | None = None, stall: float | None = None
                        ) -> tuple[list, list, SplitRefineInfo]:
    """Tighten the hidden ReLU blocks' bounds by a split search per neuron bound (see the module docstring).

    Parameters
    ----------
    blocks : list of AffineBlock
    lower, upper : lists of (n_i,) float arrays
        Sound pre-activation bounds of every block (e.g. α-CROWN's) over the box; not modified.
    box_lower, box_upper : (n_0,) arrays
        The input box.
    time_limit : float, optional
        Seconds for everything (the blocks share it in proportion to their unstable neurons);
        ``None``: 10 s per block.
    layers : iterable of int, optional
        Blocks to refine (default: every hidden ReLU block but the first, which is exact already).
    iters : int, optional
        α/β Adam steps per child (default :data:`ITERS`); ``per_row``: leaves split per row and step
        (on average, with ``objective``).
    alpha_iters : int
        Steps of the α-CROWN re-run of the later blocks after each refined block.
    stop : callable, optional
        ``stop(lower, upper)`` (numpy lists as returned) after each refined block, and every
        ``check_every`` seconds during the last hidden block (whose bounds feed the output directly);
        ``True`` ends the refinement (e.g. once the bounds prove the property).
    objective : (C (m, n_out), c0 (m,)), optional
        The property's margins ``C y + c0``: with it, the rows of the blocks in ``focus`` get split
        leaves in proportion to how much their bound matters to the margins (see :func:`_spec_weights`)
        instead of all alike.
    focus : {"last", "all", "off"}, optional
        Which blocks weigh their rows by ``objective`` (default :data:`FOCUS`): the last hidden block
        (it feeds the output, so the margins' coefficients measure it directly), every block, or none.
    stall : float, optional
        End a block's search once its unstable intervals shrink by less than this fraction of their
        starting summed width per :data:`STALL_WINDOW` seconds; its time goes to the later blocks
        (OVAL21's conv blocks gain < 2 % in 100 s while the last block starves). A block whose width
        shrank by less than this fraction in all also skips the α-CROWN re-run of the later blocks.
        ``None``: never.

    Returns
    -------
    (lower, upper, SplitRefineInfo)
        New float64 bound lists, never looser than the given ones (the output block's passed through).
    """
    t0 = time.perf_counter()
    net = TorchNet.from_blocks(blocks, device)
    L = net.n_layers
    lo, hi = net.box(box_lower, box_upper)
    lw = [net.tensor(a)[None].clone() for a in lower[:L - 1]]
    up = [net.tensor(a)[None].clone() for a in upper[:L - 1]]
    relu = [i for i in range(1, L - 1) if net.is_relu(i)]
    todo = relu if layers is None else [i for i in relu if i in set(int(j) for j in layers)]
    info = SplitRefineInfo()
    deadline = None if time_limit is None else t0 + float(time_limit)
    n_unstable = lambda i: int(((lw[i][0] < 0) & (up[i][0] > 0)).sum())  # noqa: E731
    weights = {i: max(n_unstable(i), 1) for i in todo}
    focus = FOCUS if focus is None else focus
    iters = ITERS if iters is None else int(iters)
    if focus not in ("last", "all", "off"):
        raise ValueError(f"focus must be 'last', 'all' or 'off', not {focus!r}")
    if objective is not None:
        Cobj = torch.as_tensor(np.asarray(objective[0], dtype=np.float64), dtype=net.dtype, device=net.device)
        c0obj = torch.as_tensor(np.asarray(objective[1], dtype=np.float64), dtype=net.dtype, device=net.device)
    for pos, i in enumerate(todo):
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            break
        k = n_unstable(i)
        was = (lw[i][0] < 0) & (up[i][0] > 0)
        width = float((up[i][0] - lw[i][0])[was].sum())
        if deadline is None:
            block_deadline = now + 10.0
        else:
            rest = sum(weights[j] for j in todo[pos:])
            block_deadline = now + (deadline - now) * weights[i] / rest
        proved = []

        def check(l, u, i=i):
            # the last hidden block feeds the output directly: its partial bounds may prove the query
            tl, tu = list(lw), list(up)
            tl[i], tu[i] = _tightened(lw[i], up[i], l, u)
            proved.append(bool(stop(*_to_numpy(tl, tu, lower, upper))))
            return proved[-1]

        weigh = None
        if objective is not None and (focus == "all" or (focus == "last" and i == L - 2)):
            weigh = _spec_weights(net, i, lw, up, Cobj, c0obj, lo, hi)
        l, u, steps, bounded = _refine_block(net, i, lw, up, lo, hi, block_deadline, iters, per_row, max_leaves,
                                             check if stop is not None and i == L - 2 else None,
                                             check_every, weigh, stall)
        lw[i], up[i] = _tightened(lw[i], up[i], l, u)
        info.blocks.append(i)
        info.rows.append(2 * k)
        info.steps.append(steps)
        info.leaves.append(bounded)
        info.unstable_before.append(k)
        info.unstable_after.append(n_unstable(i))
        info.width_before.append(width)
        info.width_after.append(float((up[i][0] - lw[i][0])[was].sum()))
        info.block_time.append(time.perf_counter() - now)
        rerun = time.perf_counter()
        # a block that barely moved (less than the stall fraction of its width; only with ``stall``) leaves the
        # later blocks' α-CROWN bounds where they are: skip their re-run (OVAL21's conv blocks: 28 → 28)
        moved = stall is None or info.width_after[-1] < (1.0 - stall) * width
        if moved and i + 1 < L - 1 and (deadline is None or rerun < deadline):
            # the refined block tightens the α-CROWN bounds of the later ones (intersected: never looser)
            lw, up, _ = crown.optimized_intermediate(net, lo, hi, lw, up, iters=alpha_iters, deadline=deadline,
                                                     first=i + 1)
            info.rerun_time.append(time.perf_counter() - rerun)
        else:
            info.rerun_time.append(0.0)
        if stop is not None and ((proved and proved[-1]) or stop(*_to_numpy(lw, up, lower, upper))):
            info.stopped = True
            break
    info.time = time.perf_counter() - t0
    return (*_to_numpy(lw, up, lower, upper), info)


def _to_numpy(lw, up, lower, upper) -> tuple[list, list]:
    """Torch bounds of the hidden blocks → float64 lists intersected with the given ones (output passed through)."""
    L = len(lower)
    out_l = [np.maximum(np.asarray(lower[i], dtype=np.float64), lw[i][0].cpu().numpy().astype(np.float64))
             for i in range(L - 1)]
    out_u = [np.minimum(np.asarray(upper[i], dtype=np.float64), up[i][0].cpu().numpy().astype(np.float64))
             for i in range(L - 1)]
    out_l = [np.minimum(a, b) for a, b in zip(out_l, out_u)]
    return out_l + [np.asarray(lower[L - 1], dtype=np.float64)], out_u + [np.asarray(upper[L - 1], dtype=np.float64)]
