"""Reports of :func:`mipprune.experiments.run_experiment`: rich table, CSV/JSON, figures, report.md.

Figures use matplotlib's Agg backend (no display needed). Verdicts of a pruned network are about
that network; the report keeps them apart from the dense network's and from the surrogate results
(pruned counterexamples that were re-checked on the dense network).
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

METHOD_COLORS = {"lasso": "tab:blue", "exact": "tab:purple", "greedy": "tab:cyan", "backward": "tab:olive",
                 "magnitude": "tab:orange", "random": "tab:gray", "unstructured": "tab:green"}
FIGURES = {
    "scatter": "solve_time_dense_vs_pruned.png",
    "speedup": "speedup_vs_sparsity.png",
    "accuracy": "accuracy_vs_sparsity.png",
    "binaries": "binaries_vs_sparsity.png",
}


def _fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def speedup_text(a: dict) -> str:
    """``"≥34.1×"`` when the median is a lower bound (dense timeouts charged at the limit)."""
    if a.get("speedup_median") is None:
        return "–"
    return ("≥" if a.get("speedup_is_lower_bound") else "") + f"{a['speedup_median']:.1f}×"


def verified_text(a: dict) -> str:
    if a.get("speedup_median_verified") is None:
        return "–"
    return ("≥" if a.get("verified_is_lower_bound") else "") + f"{a['speedup_median_verified']:.1f}×"


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _times(x) -> str:
    return "–" if x is None else f"{x:.1f}×"


def headline_rows(res) -> list[dict] | None:
    """The headline's three kinds of result for the best pruned net (see :func:`headline_text`), plus
    all its queries; ``None`` when there is no best net. Each row: ``kind`` ("a", "b", "c", "all"),
    ``what``, ``queries``, ``speedup`` (text), ``detail``."""
    h = res.headline
    if h is None or h["best"] is None:
        return None
    b = h["best"]
    ps = [p for p in res.pairs if p["net_id"] == b["net_id"]]
    both = [p for p in ps if p["bound"] == "exact"]
    own = [p for p in ps if p["bound"] == "lower"]          # the dense net did not decide, the pruned one did
    same = sum(p["dense_verdict"] == p["pruned_verdict"] for p in both)
    n_ver = sum(p["pruned_verdict"] == "verified" for p in own)
    sur = [x for x in res.surrogate if x["arch"] == h["arch"] and x["dense_verdict"] not in ("verified", "falsified")]
    settled = [x for x in sur if x["settled"]]
    rows = [
        {"kind": "a", "what": "like for like: both nets decide the query", "queries": len(both),
         "speedup": _times(_median([p["speedup"] for p in both])),
         "detail": f"same verdict on {same} of {len(both)}"},
        {"kind": "b", "what": "the pruned net decides its own question (the dense net timed out)",
         "queries": len(own), "speedup": ("≥" + _times(_median([p["speedup"] for p in own]))) if own else "–",
         "detail": f"{n_ver} verified / {len(own) - n_ver} falsified, about the pruned net only"},
        {"kind": "c", "what": "dense time-outs settled by a pruned net's counterexample (re-checked on dense)",
         "queries": len(sur), "speedup": "–",
         "settled": len(settled), "detail": f"{len(settled)} of {len(sur)} settled" + (
             f", median {_median([x['time_to_cex'] for x in settled]):.2f} s to the counterexample" if settled else "")},
        {"kind": "all", "what": "all queries (unsolved charged at the limit)", "queries": b["queries"],
         "speedup": speedup_text(b), "detail": f"{b['dense_timeouts']} dense time-out(s)"},
    ]
    return rows


def headline_text(res) -> str:
    """One readable sentence: on the largest network, the best pruned net within the accuracy budget,
    (a) its median speed-up where both nets decide the query, (b) how many dense time-outs it decides
    on its own terms, (c) how many of those its counterexamples settle for the dense net. The
    numbers per kind are in :func:`headline_table` / :func:`headline_markdown`."""
    h = res.headline
    cfg = res.config
    if h is None:
        return "No dense network: no headline."
    if h["best"] is None:
        return (f"Largest network {h['arch']}: no pruned network kept its accuracy within "
                f"{cfg.max_accuracy_drop:g} point(s) of the dense one, so there is no headline speed-up.")
    b, d = h["best"], h["dense"]
    a_, b_, c_, _ = headline_rows(res)
    like = (f"answers the queries both networks decide a median **{a_['speedup']}** faster ({a_['queries']} "
            f"quer{'y' if a_['queries'] == 1 else 'ies'})" if a_["queries"] else
            "decides no query that the dense net also decides (no like-for-like speed-up)")
    n_to = b["dense_timeouts"]
    if n_to == 0:
        rest = f" and the dense net decided every query within {cfg.time_limit:g} s"
    else:
        rest = (f", decides {b_['queries']} of the dense net's {n_to} time-out{'s' if n_to != 1 else ''} at "
                f"{cfg.time_limit:g} s on its own terms (its verdicts, not the dense net's)")
        if cfg.surrogate:
            rest += (f", and pruned nets' counterexamples settle {c_['settled']} of the {c_['queries']} dense "
                     "time-outs for the dense net itself")
    return (f"On the largest network ({h['arch']}, {d['neurons']} hidden ReLUs, dense accuracy "
            f"{100 * d['accuracy']:.2f} %), **{b['method']} pruning at {100 * b['sparsity']:.0f} % sparsity** "
            f"({points_text(-b['accuracy_drop'])} of accuracy) {like}{rest}.")


_HEADLINE_COLUMNS = ("", "kind of result", "queries", "median speed-up", "verdicts")


def headline_table(res):
    """The headline's rich Table: (a) like for like, (b) own question, (c) surrogate, all queries."""
    from rich.table import Table

    rows = headline_rows(res)
    best = (res.headline or {}).get("best")
    t = Table(title=f"headline — {best['net_id']} vs dense" if best else "headline")
    for i, col in enumerate(_HEADLINE_COLUMNS):
        t.add_column(col, justify="right" if col in ("queries", "median speed-up") else "left")
    for r in rows or []:
        t.add_row(f"({r['kind']})" if r["kind"] != "all" else "", r["what"], str(r["queries"]), r["speedup"],
                  r["detail"])
    return t


def headline_markdown(res) -> str:
    rows = headline_rows(res)
    if not rows:
        return ""
    lines = ["| " + " | ".join(_HEADLINE_COLUMNS) + " |", "|" + "---|" * len(_HEADLINE_COLUMNS)]
    for r in rows:
        lines.append(f"| {'(' + r['kind'] + ')' if r['kind'] != 'all' else ''} | {r['what']} | {r['queries']} | "
                     f"{r['speedup']} | {r['detail']} |")
    return "\n".join(lines)


def other_methods_text(res) -> str:
    """The best sparsity of every other method within the accuracy budget (one line, or "")."""
    h = res.headline
    if not h or h["best"] is None:
        return ""
    others = [a for a in h["per_method"].values() if a is not h["best"]]
    if not others:
        return ""
    return "Best sparsity of the other methods within the accuracy budget: " + "; ".join(
        f"{a['method']} {100 * a['sparsity']:.0f} % {speedup_text(a)} (like for like on proven-robust queries "
        f"{verified_text(a)})" for a in others) + "."


def points_text(change: float, unit: bool = True) -> str:
    """An accuracy change in points with an unambiguous sign: ``−0.67 points`` lost, ``+1.11`` gained."""
    text = f"{round(change, 2) + 0.0:+.2f}".replace("-", "\u2212")   # + 0.0: no "−0.00"
    return f"{text} points" if unit else text


def radius_text(res) -> str:
    cfg = res.config
    if cfg.radius == "fixed":
        return f"fixed radii ε∞ = {cfg.eps_linf:g}, ε1 = {cfg.eps_l1:g}"
    parts = []
    for norm in cfg.norms:
        eps = [q["eps"] for q in res.queries if q["norm"] == norm]
        if eps:
            parts.append(f"{norm} ε in [{min(eps):.3g}, {max(eps):.3g}]")
    return (f"radius per image = {cfg.radius_fraction:g} × the smallest radius at which a {cfg.calibration_time:g} s "
            f"verify run falsifies the dense net's query ({'; '.join(parts)})")


# ============================================================================ table
def _cells(a: dict) -> list[str]:
    dense = a["method"] == "dense"
    return [a["net_id"], f"{100 * a['accuracy']:.2f}", "" if dense else points_text(-a["accuracy_drop"], unit=False), str(a["params"]),
            _fmt(a["unstable_median"], ".0f"), str(a["milp_binaries_max"]), _fmt(a["bounds_time_median"], ".3f"),
            _fmt(a["time_median"], ".2f"), f"{a['verified']}/{a['falsified']}/{a['timeout']}/{a['unknown']}",
            "" if dense else speedup_text(a),
            "" if dense else f"{verified_text(a)} ({a['n_pruned_verified']})",
            "" if dense else f"{a['surrogate_valid']}/{a['surrogate_settled']}"]


_COLUMNS = ("network", "acc %", "Δacc (points)", "params", "unstable", "binaries", "bounds s", "time s",
            "V/F/T/U", "speed-up", "speed-up verified (n)", "surrogate valid/settled")


def results_table(res):
    """A rich Table, one row per network (medians over its queries; V/F/T/U = verified / falsified /
    timeout / unknown, about that network)."""
    from rich.table import Table

    t = Table(title=f"mipprune experiment — {len(res.rows)} queries, time limit {res.config.time_limit:g} s "
                    "(medians per network; verdicts are about each network itself)")
    for i, col in enumerate(_COLUMNS):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    best = (res.headline or {}).get("best") or {}
    for a in res.aggregated:
        style = "bold" if a["method"] == "dense" else "bold green" if a["net_id"] == best.get("net_id") else None
        t.add_row(*_cells(a), style=style)
    return t


def markdown_table(res) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for a in res.aggregated:
        cells = _cells(a)
        if a["method"] == "dense":
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ============================================================================ files
def _query_csv_row(r: dict) -> dict:
    row = {k: v for k, v in r.items() if k not in ("counterexample", "stage_times", "message")}
    for stage, secs in (r.get("stage_times") or {}).items():
        row[f"time_{stage}"] = secs
    row["has_counterexample"] = r.get("counterexample") is not None
    return row


def write_csv(res, path: Path) -> None:
    """``kind`` = ``network`` (aggregated), ``query`` (one per query) or ``surrogate`` (one per dense query)."""
    rows = [{"kind": "network", **a} for a in res.aggregated]
    rows += [{"kind": "query", **_query_csv_row(r)} for r in res.rows]
    rows += [{"kind": "surrogate", **{k: v for k, v in s.items() if k != "counterexample"},
              "valid_nets": ";".join(s["valid_nets"])} for s in res.surrogate]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_json(res, path: Path) -> None:
    doc = {"config": res.config.to_dict(), "headline": res.headline, "images": res.images,
           "wall_time": res.wall_time, "queries_run": res.n_run, "queries_resumed": res.n_skipped,
           "networks": res.aggregated, "queries": res.rows, "pairs": res.pairs, "surrogate": res.surrogate}
    path.write_text(json.dumps(doc, indent=1, default=str))


# ============================================================================ figures
def _sparsity_plot(res, axes: dict, key: str, ylabel: str, *, logy: bool = False, dense_line: bool = True,
                   scale: float = 1.0) -> None:
    """One panel per architecture: ``scale · a[key]`` against sparsity, a line per method."""
    for arch, ax in axes.items():
        for method in res.config.methods:
            pts = sorted((a["sparsity"], scale * a[key]) for a in res.aggregated
                         if a["arch"] == arch and a["method"] == method and a.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot([100 * x for x in xs], ys, "o-", color=METHOD_COLORS.get(method), label=method)
        d = [a for a in res.aggregated if a["arch"] == arch and a["method"] == "dense"]
        if dense_line and d and d[0].get(key) is not None:
            ax.axhline(scale * d[0][key], color="black", ls="--", lw=1, label="dense")
        ax.set_title(arch)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)


def binaries_measure(res) -> tuple[str, str, str]:
    """What the "binaries vs sparsity" figure plots: ``(aggregated key, axis label, caption)``.

    The binaries of the MILPs actually posed (per network, the median of ``milp_binaries`` over its
    queries that reached the MILP stage; networks with no such query have no point). When no query of
    the run reached the MILP (bounds, LP or an attack decided them all), it falls back to the median
    number of CROWN-unstable ReLUs (the binaries a big-M MILP *would* need), and says so.
    """
    if any(a.get("milp_binaries_median") is not None for a in res.aggregated):
        return ("milp_binaries_median", "MILP binaries posed\n(median over queries reaching the MILP)",
                "MILP binaries posed vs sparsity (median over each network's queries that reached the MILP; "
                "networks with none are not shown)")
    return ("unstable_median", "unstable ReLUs (CROWN, median)\n[no query reached the MILP]",
            "Unstable ReLUs (CROWN median: the binaries a big-M MILP would need) vs sparsity — no query of "
            "this run reached the MILP, so no MILP binaries were posed")


def make_figures(res, out: Path) -> dict:
    """Write the PNG figures into ``out``; returns ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    archs = list(dict.fromkeys(a["arch"] for a in res.aggregated))
    n = len(archs)
    limit = res.config.time_limit

    # 1. per-query solve time, dense vs pruned
    fig, ax = plt.subplots(figsize=(6, 5.5))
    markers = "osD^v<>"
    for i, arch in enumerate(archs):
        for method in res.config.methods:
            ps = [p for p in res.pairs if p["arch"] == arch and p["method"] == method]
            if not ps:
                continue
            solved = [p for p in ps if p["pruned_verdict"] in ("verified", "falsified")]
            unsolved = [p for p in ps if p not in solved]
            c = METHOD_COLORS.get(method)
            if solved:
                ax.scatter([p["dense_time"] for p in solved], [p["pruned_time"] for p in solved], s=22,
                           marker=markers[i % len(markers)], color=c, alpha=0.75,
                           label=f"{arch} {method}" if n > 1 else method)
            if unsolved:
                ax.scatter([p["dense_time"] for p in unsolved], [p["pruned_time"] for p in unsolved], s=22,
                           marker=markers[i % len(markers)], facecolors="none", edgecolors=c, alpha=0.75)
    all_t = [t for p in res.pairs for t in (p["dense_time"], p["pruned_time"])] or [1e-2, limit]
    lo = max(min(all_t) / 2, 1e-4)
    ax.plot([lo, limit * 1.5], [lo, limit * 1.5], "k-", lw=1, label="equal time")
    ax.plot([lo, limit * 1.5], [lo / 10, limit * 0.15], "k:", lw=1, label="10× faster")
    ax.axvline(limit, color="red", ls="--", lw=0.8)
    ax.axhline(limit, color="red", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dense network: query time (s)")
    ax.set_ylabel("pruned network: query time (s)")
    ax.set_title(f"Adversarial query time (red: {limit:g} s limit — on it: timed out;\n"
                 "hollow: pruned query unsolved)", fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    files["scatter"] = out / FIGURES["scatter"]
    fig.savefig(files["scatter"], dpi=120)
    plt.close(fig)

    bin_key, bin_label, _ = binaries_measure(res)
    for name, key, ylabel, logy, scale, dense_line in (
            ("speedup", "speedup_median", "median speed-up over dense (×)", True, 1, False),
            ("accuracy", "accuracy", "test accuracy (%)", False, 100, True),
            ("binaries", bin_key, bin_label, False, 1, True)):
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
        _sparsity_plot(res, dict(zip(archs, axes[0])), key, ylabel, logy=logy, dense_line=dense_line, scale=scale)
        if name == "speedup":
            for ax in axes[0]:
                ax.axhline(1, color="black", lw=0.8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        files[name] = out / FIGURES[name]
        fig.savefig(files[name], dpi=120)
        plt.close(fig)
    return files


def write_report_md(res, out: Path, figures: dict) -> Path:
    cfg = res.config
    s = res.surrogate
    unsolved = [x for x in s if x["dense_verdict"] not in ("verified", "falsified")]
    lines = [
        "# mipprune experiment: pruning speeds up adversarial-example MILPs", "",
        headline_text(res), "",
        *([headline_markdown(res), ""] if headline_rows(res) else []),
        *([other_methods_text(res), ""] if other_methods_text(res) else []),
        f"Networks: {', '.join(dict.fromkeys(a['arch'] for a in res.aggregated))} (hidden widths; digits, 64 inputs, "
        f"10 classes). Methods: {', '.join(cfg.methods)}; sparsities: "
        f"{', '.join(f'{100 * x:.0f}%' for x in cfg.sparsities)}; fine-tuning epochs: {cfg.finetune_epochs}. "
        f"Queries: {len(res.images)} test images × {', '.join(cfg.norms)} balls, {radius_text(res)}; "
        f"time limit {cfg.time_limit:g} s per query, backend {cfg.backend}, "
        f"{cfg.jobs} job(s) on executor '{cfg.executor}'. Wall time {res.wall_time:.0f} s "
        f"({res.n_run} queries run, {res.n_skipped} resumed from queries.jsonl).", "",
        "## Per network", "",
        "Verdicts (V/F/T/U = verified / falsified / timeout / unknown) are about *that* network: a pruned net's "
        "verdict says nothing about the dense net. *speed-up* = median over the same queries of dense time / "
        "pruned time, unsolved queries charged at the limit; ≥ marks a lower bound (dense queries timed out). "
        "A pruned net that is less robust often ends its query early at its own counterexample, so "
        "*speed-up verified (n)* repeats the median on the n queries the pruned net *proved* robust (like for "
        "like). *unstable* = median number of ReLUs whose CROWN bounds straddle 0 over the input region (the "
        "binaries of the big-M MILP); *binaries* = the largest MILP `verify` built (0 when bounds, LP or an "
        "attack decided); *time s* = median query time.", "",
        markdown_table(res), "",
        "## Figures", "",
    ]
    captions = {"scatter": "Query time, dense vs pruned (log axes; below the diagonal = pruned faster)",
                "speedup": "Median speed-up vs sparsity, per method", "accuracy": "Test accuracy vs sparsity",
                "binaries": binaries_measure(res)[2]}
    for k, p in figures.items():
        lines += [f"![{captions[k]}]({Path(p).name})", "", f"*{captions[k]}.*", ""]
    if cfg.surrogate:
        lines += [
            "## Surrogate search (Pham et al. 2025)", "",
            f"Pruned networks' counterexamples re-checked on the dense network in float64: "
            f"{sum(x['valid'] for x in s)} of {sum(x['candidates'] for x in s)} transfer. Dense queries unsolved by "
            f"their own MILP: {len(unsolved)}; settled (falsified for the dense net) by a surrogate: "
            f"{sum(x['settled'] for x in unsolved)}.", ""]
        if unsolved:
            lines += ["| dense query | candidates | valid on dense | settled by | time to counterexample (s) |",
                      "|---|---|---|---|---|"]
            for x in unsolved:
                lines.append(f"| {x['dense_net']} img{x['image']} {x['norm']} | {x['candidates']} | {x['valid']} | "
                             f"{x['settled_by'] or '–'} | {_fmt(x['time_to_cex'], '.2f')} |")
            lines.append("")
    lines += ["## Files", "",
              "`results.csv` / `results.json` (per query, per network, surrogate rows), `queries.jsonl` (resume log), "
              "`models/` (cached torch models), `onnx/` + `vnnlib/` + `instances.csv` (VNN-COMP layout: "
              "`mipprune verify-suite` can run it).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_all(res, data=None) -> dict:
    """Write results.csv, results.json, the figures and report.md into ``res.out``; returns the paths."""
    out = Path(res.out)
    files = {"csv": out / "results.csv", "json": out / "results.json"}
    write_csv(res, files["csv"])
    write_json(res, files["json"])
    figs = make_figures(res, out)
    files.update(figs)
    files["report"] = write_report_md(res, out, figs)
    return files


__all__ = ["results_table", "markdown_table", "headline_text", "headline_rows", "headline_table",
           "headline_markdown", "other_methods_text", "speedup_text", "write_csv", "write_json",
           "make_figures", "binaries_measure", "write_report_md", "write_all", "FIGURES"]
