"""The experiment's headline: one sentence plus a table that keeps apart (a) like-for-like speed-ups,
(b) the pruned net deciding its own question and (c) dense time-outs settled by surrogate
counterexamples (synthetic results: no training)."""
from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from mipprune.experiment import report as rep


def _pair(dv, pv, dt, pt, bound):
    return {"net_id": "3x200/random/s85", "dense_verdict": dv, "pruned_verdict": pv, "dense_time": dt,
            "pruned_time": pt, "speedup": dt / pt, "bound": bound}


def _res(surrogate=True):
    best = {"net_id": "3x200/random/s85", "method": "random", "sparsity": 0.85, "accuracy": 0.95,
            "accuracy_drop": 0.67, "queries": 5, "speedup_median": 40.0, "speedup_is_lower_bound": True,
            "dense_timeouts": 3, "speedup_median_verified": 9.0, "verified_is_lower_bound": False}
    pairs = [_pair("verified", "verified", 2.0, 1.0, "exact"), _pair("falsified", "verified", 3.0, 0.5, "exact"),
             _pair("timeout", "verified", 10.0, 0.25, "lower"), _pair("timeout", "falsified", 10.0, 0.1, "lower"),
             _pair("timeout", "timeout", 10.0, 10.0, "none"),
             {**_pair("verified", "verified", 1.0, 1.0, "exact"), "net_id": "other"}]
    sur = [{"arch": "3x200", "dense_verdict": "timeout", "settled": True, "time_to_cex": 0.1},
           {"arch": "3x200", "dense_verdict": "timeout", "settled": False, "time_to_cex": None},
           {"arch": "3x200", "dense_verdict": "timeout", "settled": False, "time_to_cex": None},
           {"arch": "3x200", "dense_verdict": "verified", "settled": False, "time_to_cex": None}]
    headline = {"arch": "3x200", "dense": {"neurons": 600, "accuracy": 0.9567}, "best": best,
                "per_method": {"random": best}, "dense_unsolved": 3, "surrogate_settled": 1}
    cfg = SimpleNamespace(time_limit=10.0, max_accuracy_drop=1.0, surrogate=surrogate)
    return SimpleNamespace(headline=headline, pairs=pairs, surrogate=sur, config=cfg)


def test_headline_is_one_sentence_and_the_table_separates_the_three_kinds():
    res = _res()
    text = rep.headline_text(res)
    assert text.count(". ") == 0 and text.endswith(".")             # one sentence
    assert "random pruning at 85 % sparsity" in text and "\u22120.67 points" in text
    assert "median **4.0×** faster (2 queries)" in text               # (a): median of 2× and 6×
    assert "decides 2 of the dense net's 3 time-outs" in text          # (b)
    assert "settle 1 of the 3 dense time-outs" in text                 # (c)
    rows = {r["kind"]: r for r in rep.headline_rows(res)}
    assert rows["a"]["queries"] == 2 and rows["a"]["speedup"] == "4.0×" and "same verdict on 1 of 2" in rows["a"]["detail"]
    assert rows["b"]["queries"] == 2 and rows["b"]["speedup"] == "≥70.0×" and "1 verified / 1 falsified" in rows["b"]["detail"]
    assert rows["c"]["queries"] == 3 and rows["c"]["settled"] == 1
    md = rep.headline_markdown(res)
    assert md.count("\n") == 5 and "| (a) | like for like" in md
    console = Console(record=True, width=160)
    console.print(rep.headline_table(res))
    out = console.export_text()
    assert "like for like" in out and "own question" in out and "counterexample" in out


def test_headline_without_dense_timeouts_or_surrogate_says_so():
    res = _res(surrogate=False)
    res.headline["best"] = {**res.headline["best"], "dense_timeouts": 0}
    text = rep.headline_text(res)
    assert "decided every query within 10 s" in text and "settle" not in text
    res = _res(surrogate=False)
    assert "settle" not in rep.headline_text(res)
