"""Conflict clauses learned by ReLU branch and bound, and their unit propagation.

A sub-domain of a ReLU-split search is a set of *literals* — neuron ``i`` active (``+1``: its
pre-activation ``≥ 0``) or inactive (``−1``: ``≤ 0``) — and a disjunct. When the bound proves a
domain safe, every input whose activation pattern satisfies its literals is safe for that
disjunct: the clause "not all of these literals" holds for every counterexample. Such a clause
only helps elsewhere in the tree once it is *shorter* than the domain it came from (the domain
itself is pruned already): :func:`mipprune.verification.bab.relu_bab` drops the literals that do
not carry the proof (split multipliers β ≈ 0) and keeps the clause only if the bound proves the
shorter literal set too (BICCOS's constraint strengthening, Zhou et al. 2024, used here by unit
propagation rather than by cutting planes in the bound).

Propagation on a domain ``S``: a clause none of whose literals ``S`` contradicts and all of whose
literals ``S`` sets lies inside a proven region (the domain is safe); one with a single literal
open forces that neuron the other way (an *implied split*: the part of ``S`` with the literal
set is proven already). A neuron forced both ways proves the domain. Soundness rests on each clause
having been proven by a sound bound on its own literal set, from the same root bounds.

Clauses are stored densely over the root-unstable neurons (the only ones a search splits), as two
0/1 float32 matrices (positive and negative literals), so one step's propagation is two matrix
products; at most ``max_bytes`` of them are kept (the least used half is dropped when full).
"""
from __future__ import annotations

import torch

__all__ = ["ConflictClauses"]

MAX_BYTES = 64 << 20     # memory of the stored clauses (both literal matrices)
ROUNDS = 3               # propagation rounds per call (an implied split can enable another clause)


class ConflictClauses:
    """Learned clauses of one search over ``n`` splittable neurons (positions ``0 … n−1`` in the
    caller's compact numbering), each tagged with the disjunct it was proven for."""

    def __init__(self, n: int, device, max_bytes: int = MAX_BYTES):
        self.n, self.device = n, device
        self.capacity = max(16, int(max_bytes) // max(1, 8 * n))
        self.pos = torch.zeros((0, n), dtype=torch.float32, device=device)   # (K, n) 1 where the literal is +1
        self.neg = torch.zeros((0, n), dtype=torch.float32, device=device)   # (K, n) 1 where it is −1
        self.size = torch.zeros(0, dtype=torch.float32, device=device)       # literals per clause
        self.tag = torch.zeros(0, dtype=torch.long, device=device)
        self.hits = torch.zeros(0, dtype=torch.long, device=device)
        self.stats = {"learned": 0, "pruned": 0, "implied": 0, "dropped": 0}

    def __len__(self) -> int:
        return int(self.size.numel())

    def add(self, lits: torch.Tensor, tags: torch.Tensor) -> int:
        """Add clauses ``lits`` (K, n) in {−1, 0, +1} (each a proven literal set) for disjuncts ``tags``
        (K,); duplicates of stored clauses and empty ones are skipped. Returns how many were added."""
        if lits.shape[0] == 0:
            return 0
        pos, neg = (lits > 0).float(), (lits < 0).float()
        size = pos.sum(1) + neg.sum(1)
        keep = size > 0
        if len(self):   # a clause equal to a stored one (same disjunct) adds nothing
            same = (pos @ self.pos.T + neg @ self.neg.T == size[:, None]) & (size[:, None] == self.size[None]) \
                & (tags[:, None] == self.tag[None])
            keep &= ~same.any(1)
        if not bool(keep.any()):
            return 0
        pos, neg, size, tags = pos[keep], neg[keep], size[keep], tags[keep]
        # within the batch: one copy of each (lexicographic key on the literal vector)
        key = torch.cat([pos - neg, tags[:, None].float()], 1)
        _, first = torch.unique(key, dim=0, return_inverse=True)
        order = torch.arange(first.numel(), device=first.device)
        uniq = torch.full((int(first.max()) + 1,), first.numel(), dtype=torch.long, device=first.device)
        uniq = uniq.scatter_reduce(0, first, order, reduce="amin")
        pos, neg, size, tags = pos[uniq], neg[uniq], size[uniq], tags[uniq]
        if len(self) + size.numel() > self.capacity:   # full: keep the most used half
            keep_n = max(0, min(len(self), self.capacity // 2, self.capacity - size.numel()))
            top = torch.argsort(self.hits, descending=True, stable=True)[:keep_n]
            self.stats["dropped"] += len(self) - keep_n
            self.pos, self.neg, self.size = self.pos[top], self.neg[top], self.size[top]
            self.tag, self.hits = self.tag[top], self.hits[top]
            room = self.capacity - len(self)
            pos, neg, size, tags = pos[:room], neg[:room], size[:room], tags[:room]
        self.pos, self.neg = torch.cat([self.pos, pos]), torch.cat([self.neg, neg])
        self.size, self.tag = torch.cat([self.size, size]), torch.cat([self.tag, tags])
        self.hits = torch.cat([self.hits, torch.zeros(size.numel(), dtype=torch.long, device=self.device)])
        self.stats["learned"] += int(size.numel())
        return int(size.numel())

    def propagate(self, lits: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit propagation on domains ``lits`` (D, n) in {−1, 0, +1} of disjuncts ``tags`` (D,).
        Returns ``(lits', proven)``: the literals with the implied splits set (a new tensor when any
        is, of ``lits``' dtype) and a (D,) mask of domains inside a proven region."""
        D = lits.shape[0]
        proven = torch.zeros(D, dtype=torch.bool, device=lits.device)
        if not len(self) or D == 0:
            return lits, proven
        same_tag = tags[:, None] == self.tag[None]
        out = lits
        for _ in range(ROUNDS):
            sp, sn = (out > 0).float(), (out < 0).float()
            sat = sp @ self.pos.T + sn @ self.neg.T                   # (D, K) literals the domain sets
            clash = sp @ self.neg.T + sn @ self.pos.T                 # (D, K) literals it contradicts
            live = same_tag & (clash == 0)
            full = live & (sat == self.size[None])
            unit = live & (sat == self.size[None] - 1)
            self.hits += (full | unit).sum(0)
            proven |= full.any(1)
            if not bool(unit.any()):
                break
            u = unit.float()
            # the open literal of each unit clause is forced the other way
            force_neg = (u @ self.pos) * (1 - sp - sn) > 0           # a +1 literal open → the neuron inactive
            force_pos = (u @ self.neg) * (1 - sp - sn) > 0
            proven |= (force_neg & force_pos).any(1)
            new = (force_neg | force_pos) & ~proven[:, None]
            if not bool(new.any()):
                break
            self.stats["implied"] += int(new.sum())
            out = out.clone() if out is lits else out
            out[new & force_pos] = 1
            out[new & force_neg] = -1
        self.stats["pruned"] += int(proven.sum())
        return out, proven
