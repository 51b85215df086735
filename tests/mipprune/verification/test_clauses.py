"""Conflict clauses of ReLU branch and bound (clauses.py, relu_bab(clauses=True)): propagation
proves, implies and respects disjuncts as the clauses say; clauses learned by a search hold on
an exact MILP's check; searches with clauses agree with brute force."""
from __future__ import annotations

import time

import numpy as np
import torch

from mipprune.verification import bab
from mipprune.verification.bounds import compute_bounds
from mipprune.verification.clauses import ConflictClauses
from solvers.milp import build_milp, solve_highs
from solvers.result import Status
from tests.mipprune.verification.test_bab import _case


def _lits(*rows):
    return torch.tensor(rows, dtype=torch.int8)


def test_propagation_proves_implies_and_keeps_to_its_disjunct():
    book = ConflictClauses(5, "cpu")
    # disjunct 0: not (x0 active and x2 inactive); disjunct 1: not (x1 active)
    assert book.add(_lits([1, 0, -1, 0, 0], [0, 1, 0, 0, 0]), torch.tensor([0, 1])) == 2
    S = _lits([1, 0, -1, 0, 0],    # every literal of clause 0: proven
              [1, 0, 0, 0, 0],     # clause 0 with x2 open: x2 forced active
              [1, 0, 1, 0, 0],     # contradicts clause 0: nothing
              [0, 0, 0, 0, 0],     # two literals open: nothing
              [0, 1, 0, 0, 0])     # clause 1 (x1 active) is disjunct 1's: nothing for disjunct 0
    out, proven = book.propagate(S, torch.zeros(5, dtype=torch.long))
    assert proven.tolist() == [True, False, False, False, False]
    assert out[1].tolist() == [1, 0, 1, 0, 0]
    assert torch.equal(out[2:], S[2:])
    assert S[1].tolist() == [1, 0, 0, 0, 0], "the caller's tensor is not written"
    # disjunct 1: an open x1 is forced inactive; x1 active is proven
    out, proven = book.propagate(_lits([0, 0, 0, 0, 0], [0, 1, 0, 0, 0]), torch.tensor([1, 1]))
    assert out[0].tolist() == [0, -1, 0, 0, 0] and proven.tolist() == [False, True]
    assert book.stats["implied"] == 2 and book.stats["pruned"] == 2


def test_a_neuron_forced_both_ways_proves_the_domain_and_implications_chain():
    book = ConflictClauses(4, "cpu")
    book.add(_lits([1, 1, 0, 0], [1, -1, 0, 0], [0, 0, 1, 1]), torch.zeros(3, dtype=torch.long))
    out, proven = book.propagate(_lits([1, 0, 0, 0]), torch.zeros(1, dtype=torch.long))
    assert proven.tolist() == [True]          # x1 must be inactive (clause 0) and active (clause 1)
    book = ConflictClauses(4, "cpu")
    book.add(_lits([1, -1, 0, 0], [-1, 0, 1, 0]), torch.zeros(2, dtype=torch.long))
    out, proven = book.propagate(_lits([0, 0, 0, 0]), torch.zeros(1, dtype=torch.long))
    assert not proven.any() and out.tolist() == [[0, 0, 0, 0]]
    out, _ = book.propagate(_lits([0, -1, -1, 0]), torch.zeros(1, dtype=torch.long))
    # x1 inactive → x0 inactive (clause 0) → then clause 1 with x2 inactive clashes: nothing more
    assert out.tolist() == [[-1, -1, -1, 0]]


def test_duplicates_are_stored_once_and_the_store_stays_within_its_bytes():
    book = ConflictClauses(8, "cpu", max_bytes=8 * 8 * 20)   # room for 20 clauses (at least 16)
    c = _lits([1, 0, 0, -1, 0, 0, 0, 0])
    assert book.add(torch.cat([c, c]), torch.zeros(2, dtype=torch.long)) == 1
    assert book.add(c, torch.zeros(1, dtype=torch.long)) == 0
    assert book.add(c, torch.ones(1, dtype=torch.long)) == 1          # another disjunct's
    assert book.add(_lits([0] * 8), torch.zeros(1, dtype=torch.long)) == 0
    rng = np.random.default_rng(0)
    many = torch.as_tensor(rng.choice([-1, 0, 1], size=(60, 8)), dtype=torch.int8)
    book.add(many, torch.zeros(60, dtype=torch.long))
    assert len(book) <= book.capacity == 20 and book.stats["dropped"] > 0


def _restricted_milp(net, spec, b, where, p, n):
    """The MILP of ``net`` on the spec's box with the root bounds ``b`` and the literals fixed (``p`` /
    ``n`` 0/1 over the split positions ``where`` of the hidden neurons)."""
    lo, hi = np.concatenate(b.lower[:-1]), np.concatenate(b.upper[:-1])
    lo[where[p > 0]] = np.maximum(lo[where[p > 0]], 0.0)
    hi[where[n > 0]] = np.minimum(hi[where[n > 0]], 0.0)
    cut = np.cumsum([a.size for a in b.lower[:-1]])[:-1]
    return build_milp(net, np.split(lo, cut) + [b.lower[-1]], np.split(hi, cut) + [b.upper[-1]],
                      lower=spec.lower, upper=spec.upper)


def test_learned_clauses_are_proofs_that_an_exact_milp_confirms(monkeypatch):
    """A falsifiable property searched with its counterexample checks switched off, so the search
    learns clauses around unsafe inputs: for the shortest clauses (the likeliest to be wrong), the
    MILP of the disjunct's unsafe region restricted to the clause's literals is infeasible — no input
    with that activation pattern violates the property — while the unrestricted one is feasible."""
    net, spec = _case(0, 0.25, (8, 24, 24, 24, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    disj = list(range(len(spec.disjuncts)))
    books, groups = [], []
    real_book, real_search = bab.ConflictClauses, bab._search_rows
    monkeypatch.setattr(bab, "ConflictClauses", lambda *a, **k: books.append(real_book(*a, **k)) or books[-1])
    monkeypatch.setattr(bab, "_search_rows", lambda st, spec_, disjuncts, *a, **k:
                        groups.append((st, list(disjuncts))) or real_search(st, spec_, disjuncts, *a, **k))
    monkeypatch.setattr(bab._Checker, "__call__", lambda self, X: None)
    monkeypatch.setattr(bab._Checker, "pgd", lambda self, starts, seconds: None)
    r = bab.relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 15, batch=8,
                     clauses=True)
    assert r.status in ("unknown", "timeout") and r.info["clauses"]["learned"] >= 20
    (st, disjuncts), = groups
    book, = books
    where = st.split_idx.numpy()
    pos, neg, tag = book.pos.numpy(), book.neg.numpy(), book.tag.numpy()
    unsafe = [solve_highs(_restricted_milp(net, spec, b, where, 0 * pos[0], 0 * neg[0])
                          .with_output_constraints(*spec.disjuncts[d]), time_limit=20).status for d in disjuncts]
    assert Status.INFEASIBLE in unsafe and len(set(unsafe)) == 2, "one disjunct must be falsifiable"
    for c in np.argsort((pos + neg).sum(1), kind="stable")[:20]:
        A, bb = spec.disjuncts[disjuncts[tag[c]]]
        sol = solve_highs(_restricted_milp(net, spec, b, where, pos[c], neg[c]).with_output_constraints(A, bb - 1e-7),
                          time_limit=20)
        assert sol.status == Status.INFEASIBLE, (pos[c] - neg[c], sol.status)


def test_clauses_leave_the_verdicts_of_a_search_unchanged():
    net, spec = _case(2, 0.25, (8, 24, 24, 24, 3))
    blocks = net.to_affine_relu()
    b = compute_bounds(net, spec.lower, spec.upper, "crown")
    disj = list(range(len(spec.disjuncts)))
    runs = [bab.relu_bab(net, spec, blocks, b.lower, b.upper, disj, deadline=time.perf_counter() + 60, batch=8,
                         clauses=c) for c in (False, True)]
    assert runs[0].status == runs[1].status == "verified"
    assert runs[1].info["clauses"]["learned"] > 0 and "clauses" not in runs[0].info
