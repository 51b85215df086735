"""Cutting planes of a MILP's root node, from SCIP (for cut-aware bound propagation: GCP-CROWN).

HiGHS separates cuts too, but hands its pool over only after the root's separation loop has ended,
and on OVAL21-sized verification MILPs that loop had not ended after 300 s (measured, session 23).
SCIP stops after ``rounds`` separation rounds (``separating/maxroundsroot``) and leaves its cuts in the
LP, where they are read back (:func:`root_cuts`). SCIP runs with presolve off (its cuts stay in the
model's own columns) and heuristics off (no incumbent: no cut that depends on an objective cutoff).
The root LP is solved by primal simplex with quick-start steepest-edge pricing, and the root does no strong
branching (``ROOT_LP_PARAMS``): SCIP's default dual simplex spent 85 of 98 s in the first LP of OVAL21 deep img4405
(10,780 columns); this way the whole call takes 21 s, and 2-7x less on the other OVAL21 MILPs (session 27).

Validity: a cut is SCIP's claim; each is loosened by SCIP's feasibility tolerance times the cut's
scale (``CUT_SLACK``), so a cut that holds only up to that tolerance still holds. Cuts of a model
without output constraints hold for every point of the network on the region, whatever the objective.

Optional: needs ``pyscipopt`` (``pip install mipprune[scip]``); :func:`available` says whether it is there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from solvers.errors import SolverNotAvailableError
from solvers.milp import MilpModel

__all__ = ["RootCuts", "available", "root_cuts"]

CUT_SLACK = 1e-6     # each cut's right-hand side is loosened by this × (1 + Σ |a_i| · max |v_i|)
ROOT_LP_PARAMS = {"lp/initalgorithm": "p",                # primal simplex for the first LP …
                  "lp/pricing": "q",                      # … with quick-start steepest edge
                  "branching/leastinf/priority": 10**6}   # the root ends by branching: no strong branching LPs


@dataclass
class RootCuts:
    """``coef @ v <= rhs`` (``coef`` (K, n_vars) CSR over the model's columns ``v``); ``bound``: SCIP's root dual
    bound of the model's objective (``None`` if it has none), ``info``: rounds, seconds, status, cut families."""

    coef: sp.csr_matrix
    rhs: np.ndarray
    bound: float | None
    seconds: float
    info: dict = field(default_factory=dict)
    model: MilpModel | None = None     # the model whose columns ``coef`` indexes


    @property
    def K(self) -> int:
        return int(self.rhs.size)


def available() -> bool:
    try:
        import pyscipopt  # noqa: F401
    except ImportError:
        return False
    return True


def root_cuts(model: MilpModel, *, rounds: int = 3, time_limit: float | None = None, threads: int = 1) -> RootCuts:
    """SCIP's root node of ``model`` (objective as set) with at most ``rounds`` separation rounds and no
    branching; returns the global cuts in its LP. Raises :class:`SolverNotAvailableError` without pyscipopt."""
    try:
        import pyscipopt as ps
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise SolverNotAvailableError("root cuts need pyscipopt (pip install 'mipprune[scip]')") from e
    t0 = time.perf_counter()
    m = ps.Model()
    m.hideOutput()
    n = model.n_vars
    v = [m.addVar(name=f"v{i}", lb=float(model.col_lower[i]), ub=float(model.col_upper[i]),
                  vtype="B" if model.integrality[i] else "C", obj=float(model.cost[i])) for i in range(n)]
    A = model.A.tocsr()
    for r in range(A.shape[0]):
        s, e = A.indptr[r], A.indptr[r + 1]
        expr = ps.quicksum(float(A.data[k]) * v[A.indices[k]] for k in range(s, e))
        lo, hi = float(model.row_lower[r]), float(model.row_upper[r])
        if lo == hi:
            m.addCons(expr == lo)
            continue
        if np.isfinite(lo):
            m.addCons(expr >= lo)
        if np.isfinite(hi):
            m.addCons(expr <= hi)
    m.setPresolve(ps.SCIP_PARAMSETTING.OFF)
    m.setHeuristics(ps.SCIP_PARAMSETTING.OFF)
    m.setParam("limits/nodes", 1)
    m.setParam("separating/maxroundsroot", int(rounds))
    m.setParam("lp/threads", int(threads))
    for k, val in ROOT_LP_PARAMS.items():
        m.setParam(k, val)
    if time_limit is not None:
        m.setParam("limits/time", max(1.0, float(time_limit) - (time.perf_counter() - t0)))
    m.optimize()
    status = m.getStatus()
    bound = float(m.getDualbound()) + model.offset
    rows = [r for r in m.getLPRowsData() if str(r.getOrigintype()) == "3" and not r.isLocal()]   # separator rows
    scale = np.maximum(np.abs(model.col_lower), np.abs(model.col_upper))
    R, C, V, d = [], [], [], []
    families: dict = {}
    for row in rows:
        names = [c.getVar().name.removeprefix("t_") for c in row.getCols()]
        if not all(nm.startswith("v") for nm in names):
            continue
        idx = np.array([int(nm[1:]) for nm in names], dtype=np.int64)
        a = np.asarray(row.getVals(), dtype=np.float64)
        c0 = float(row.getConstant())
        slack = CUT_SLACK * (1.0 + float(np.abs(a) @ scale[idx]))
        fam = row.name.rstrip("0123456789_")
        for sign, side in ((1.0, row.getRhs() - c0), (-1.0, -(row.getLhs() - c0))):
            if abs(side) >= 1e19:
                continue
            R.append(np.full(idx.size, len(d)))
            C.append(idx)
            V.append(sign * a)
            d.append(side + slack)
            families[fam] = families.get(fam, 0) + 1
    K = len(d)
    coef = sp.csr_matrix((np.concatenate(V) if V else np.zeros(0), (np.concatenate(R) if R else np.zeros(0, int),
                                                                   np.concatenate(C) if C else np.zeros(0, int))),
                         shape=(K, n))
    return RootCuts(coef, np.asarray(d, dtype=np.float64), bound, time.perf_counter() - t0,
                    {"status": status, "rounds": rounds, "families": families, "lp_rows": m.getNLPRows(),
                     "lp_iterations": m.getNLPIterations(),
                     "strong_branching_iterations": m.getNStrongbranchLPIterations()}, model)
