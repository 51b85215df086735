"""The experiment's analysis: dense/pruned query pairs, surrogate search (pruned-net counterexamples
re-checked on the dense net), per-network aggregates and the headline."""
from __future__ import annotations

import statistics
import time

import numpy as np
from mipprune.experiment.config import ExperimentConfig, SOLVED
from mipprune.experiment.networks import NetEntry
from mipprune.experiment.queries import make_spec



# ============================================================================ analysis
def _charged(row: dict) -> float:
    """Seconds charged to a query: its time if solved, else exactly the time limit (timeouts counted at
    the limit, even where the solver overshot it: conservative for speed-ups over dense)."""
    return float(row["time"]) if row["verdict"] in SOLVED else float(row["time_limit"])


def pair_queries(rows: list[dict]) -> list[dict]:
    """For every pruned-net query, the dense query of the same (arch, image, norm, eps) and the
    speed-up ``dense / pruned`` (times charged as in :func:`_charged`). ``bound`` tells how to read
    it: ``"exact"`` (both solved), ``"lower"`` (dense unsolved: the true speed-up is at least this),
    ``"upper"`` (pruned unsolved), ``"none"`` (neither solved: both charged the limit)."""
    dense = {(r["arch"], r["image"], r["norm"], r["eps"]): r for r in rows if r["method"] == "dense"}
    pairs = []
    for r in rows:
        if r["method"] == "dense":
            continue
        d = dense.get((r["arch"], r["image"], r["norm"], r["eps"]))
        if d is None:
            continue
        ds, ps = d["verdict"] in SOLVED, r["verdict"] in SOLVED
        bound = "exact" if ds and ps else "lower" if ps else "upper" if ds else "none"
        pairs.append({"net_id": r["net_id"], "arch": r["arch"], "method": r["method"], "sparsity": r["sparsity"],
                      "image": r["image"], "norm": r["norm"], "eps": r["eps"],
                      "dense_verdict": d["verdict"], "pruned_verdict": r["verdict"],
                      "dense_time": _charged(d), "pruned_time": _charged(r),
                      "speedup": _charged(d) / max(_charged(r), 1e-9), "bound": bound})
    return pairs


def surrogate_search(cfg: ExperimentConfig, rows: list[dict], entries: list[NetEntry], data) -> list[dict]:
    """Pham et al.: re-check every pruned net's counterexample on its dense net (float64 forward).

    One row per dense query: ``candidates`` (pruned counterexamples proposed), ``valid`` (those that
    are counterexamples of the *dense* net too), and, for dense queries its own MILP left unsolved,
    ``settled`` (a valid one exists, or PGD on the dense net started from the candidates found one),
    ``settled_by`` (net id or ``"pgd"``) and ``time_to_cex`` (the pruned query's seconds, plus PGD's).
    Every ``settled`` row has its counterexample re-checked with ``Spec.is_counterexample``.
    """
    from mipprune.verification.attack import pgd_attack

    nets = {e.net_id: e for e in entries}
    by_query: dict[tuple, list[dict]] = {}
    for r in rows:
        by_query.setdefault((r["arch"], r["image"], r["norm"], r["eps"]), []).append(r)
    out = []
    for (arch, image, norm, eps), group in sorted(by_query.items(), key=lambda kv: str(kv[0])):
        dense_rows = [r for r in group if r["method"] == "dense"]
        if not dense_rows:
            continue
        d = dense_rows[0]
        dense_net = nets[d["net_id"]].network
        spec = make_spec(data, image, norm, eps)
        cands = sorted((r for r in group if r["method"] != "dense" and r["counterexample"] is not None),
                       key=lambda r: r["time"])
        valid = [r for r in cands if spec.is_counterexample(dense_net, np.asarray(r["counterexample"]))]
        row = {"arch": arch, "image": image, "norm": norm, "eps": eps, "dense_net": d["net_id"],
               "dense_verdict": d["verdict"], "dense_time": _charged(d), "candidates": len(cands),
               "valid": len(valid), "valid_nets": [r["net_id"] for r in valid], "settled": False,
               "settled_by": None, "time_to_cex": None, "counterexample": None}
        if d["verdict"] not in SOLVED:
            if valid:
                row.update(settled=True, settled_by=valid[0]["net_id"], time_to_cex=float(valid[0]["time"]),
                           counterexample=valid[0]["counterexample"])
            elif cands and cfg.surrogate_pgd:
                t0 = time.perf_counter()
                x = pgd_attack(dense_net, spec, starts=np.array([r["counterexample"] for r in cands]),
                               time_limit=cfg.pgd_time_limit, seed=cfg.seed)
                if x is not None and spec.is_counterexample(dense_net, x):
                    row.update(settled=True, settled_by="pgd",
                               time_to_cex=float(cands[0]["time"]) + time.perf_counter() - t0,
                               counterexample=[float(v) for v in x])
        out.append(row)
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def aggregate(cfg: ExperimentConfig, entries: list[NetEntry], rows: list[dict], pairs: list[dict],
              surrogate: list[dict]) -> list[dict]:
    """One row per network: accuracy, size, MILP size, times, verdict counts, speed-up over dense."""
    dense_acc = {e.arch: e.accuracy for e in entries if e.method == "dense"}
    agg = []
    for e in entries:
        rs = [r for r in rows if r["net_id"] == e.net_id]
        milp_rs = [r for r in rs if r["milp_vars"] > 0]
        ps = [p for p in pairs if p["net_id"] == e.net_id]
        verdicts = {v: sum(r["verdict"] == v for r in rs) for v in ("verified", "falsified", "unknown", "timeout")}
        bounds = {p["bound"] for p in ps}
        a = {**e.summary(),
             "accuracy_drop": 100 * (dense_acc[e.arch] - e.accuracy),   # points
             "queries": len(rs), **verdicts,
             "unstable_median": _median([r["unstable"] for r in rs]),
             "milp_binaries_max": max((r["milp_binaries"] for r in rs), default=0),
             # the MILPs actually posed: queries that reached the MILP stage (a model was built)
             "milp_queries": len(milp_rs),
             "milp_binaries_median": _median([r["milp_binaries"] for r in milp_rs]),
             "milp_vars_max": max((r["milp_vars"] for r in rs), default=0),
             "bounds_time_median": _median([r["bounds_time"] for r in rs]),
             "milp_time_median": _median([r["stage_times"].get("milp", 0.0) for r in rs]),
             "time_median": _median([_charged(r) for r in rs]),
             "time_total": float(sum(_charged(r) for r in rs))}
        if e.method != "dense":
            sp = [p["speedup"] for p in ps]
            ver = [p for p in ps if p["pruned_verdict"] == "verified"]
            a.update(speedup_median=_median(sp), speedup_geomean=float(np.exp(np.mean(np.log(sp)))) if sp else None,
                     speedup_is_lower_bound=bool("lower" in bounds and "upper" not in bounds),
                     # like for like: only the queries this net *proved* robust (no early exit at a
                     # counterexample of a less robust net)
                     speedup_median_verified=_median([p["speedup"] for p in ver]), n_pruned_verified=len(ver),
                     verified_is_lower_bound=bool(any(p["bound"] == "lower" for p in ver)),
                     same_verdict=sum(p["dense_verdict"] == p["pruned_verdict"] and p["bound"] == "exact" for p in ps),
                     dense_timeouts=sum(p["bound"] in ("lower", "none") for p in ps),
                     solved_where_dense_unsolved=sum(p["bound"] == "lower" for p in ps),
                     surrogate_candidates=sum(r["counterexample"] is not None for r in rs),
                     surrogate_valid=sum(e.net_id in s["valid_nets"] for s in surrogate),
                     surrogate_settled=sum(s["settled_by"] == e.net_id for s in surrogate))
        agg.append(a)
    return agg


def headline(cfg: ExperimentConfig, agg: list[dict], surrogate: list[dict]) -> dict | None:
    """The headline of a run: on the largest architecture, among pruned nets losing at most
    ``cfg.max_accuracy_drop`` points of test accuracy, the one with the largest median speed-up
    (``best``) and the best sparsity of each method (``per_method``); ``None`` without a dense net."""
    dense = [a for a in agg if a["method"] == "dense"]
    if not dense:
        return None
    largest = max(dense, key=lambda a: (a["neurons"], a["params"]))
    sur = [s for s in surrogate if s["arch"] == largest["arch"]]
    cands = [a for a in agg if a["arch"] == largest["arch"] and a["method"] != "dense"
             and a["accuracy_drop"] <= cfg.max_accuracy_drop + 1e-9 and a.get("speedup_median") is not None]
    rank = lambda a: (a["speedup_median"], -a["accuracy_drop"])  # noqa: E731
    per_method = {}
    for a in cands:
        if a["method"] not in per_method or rank(a) > rank(per_method[a["method"]]):
            per_method[a["method"]] = a
    return {"arch": largest["arch"], "dense": largest, "best": max(cands, key=rank) if cands else None,
            "per_method": per_method, "dense_unsolved": sum(s["dense_verdict"] not in SOLVED for s in sur),
            "surrogate_settled": sum(s["settled"] for s in sur)}


