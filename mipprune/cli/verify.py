"""``mipprune verify`` (one ONNX network + VNN-LIB property) and ``mipprune verify-suite`` (a folder).

``verify`` writes the VNN-COMP result file: ``sat`` followed by the counterexample assignment
``((X_0 v) … (Y_0 v) …)``, or ``unsat``, ``timeout``, ``unknown``. ``verify-suite`` runs an
``instances.csv`` in a process pool, writes one CSV row per instance and prints a summary that, when
a ``ground_truth.csv`` sits beside it, checks our verdicts against the competition's consensus.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mipprune.cli._app import app
from solvers.errors import InvalidInputError

_WORD_STYLE = {"sat": "bold red", "unsat": "bold green", "timeout": "yellow", "unknown": "yellow",
               "error": "red"}


@app.command("verify")
def verify_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="ONNX file of a feed-forward ReLU network."),
    prop: Path = typer.Argument(..., metavar="PROPERTY", help="VNN-LIB 1.0 property file."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds for the whole query (loading included)."),
    result: Optional[Path] = typer.Option(None, "--result", help="Write the VNN-COMP result file here."),
    backend: str = typer.Option("highs", "--backend", help="MILP backend: highs or pyomo-<solver>."),
    seed: int = typer.Option(0, "--seed", help="Seed of the attack's random restarts."),
    device: str = typer.Option("cpu", "--device", help="Bound engine of branch and bound: cpu or cuda[:N]."),
    threads: int = typer.Option(1, "--threads", help="Torch threads of the searches (branch and bound); "
                                "use the machine's idle cores for a single query."),
    precision: str = typer.Option("auto", "--precision", help="Bound engine dtype: auto (float64 on cpu, "
                                  "float32 on cuda), float64 or float32."),
) -> None:
    """Verify PROPERTY on MODEL: sat (counterexample found), unsat (proven), timeout or unknown.

    With --result the result file is always written, also when the query fails (``error`` and the
    reason as a ``;`` comment line), as VNN-COMP harnesses expect."""
    from rich.table import Table

    from mipprune.cli._console import make_console
    from mipprune.verification.suite import verify_files
    from solvers.network.vnnlib import result_word, write_result

    console = make_console()
    try:
        if not timeout > 0:
            raise InvalidInputError(f"--timeout must be > 0 seconds; got {timeout}")
        res, load_s = verify_files(model, prop, time_limit=timeout, backend=backend, seed=seed, device=device,
                                   threads=threads, precision=precision)
    except BaseException as exc:   # the harness still gets its result file, then the error propagates
        if result is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _write_failure(result, "error", f"{type(exc).__name__}: {exc}")
        raise
    word = result_word(res.verdict)
    if result is not None:
        write_result(result, res.verdict, res.counterexample, res.output)
        if word in ("timeout", "unknown") and res.message:
            _write_failure(result, word, res.message)
    tab = Table(title=f"{model.name} · {prop.name}", show_header=False)
    tab.add_column("", style="bold")
    tab.add_column("")
    tab.add_row("result", f"[{_WORD_STYLE[word]}]{word}[/] ({res.verdict.value})")
    tab.add_row("time", f"{res.time + load_s:.2f} s (load {load_s:.2f} s) of {timeout:g} s")
    tab.add_row("decided by", res.stage)
    if res.stage_times:
        tab.add_row("stage times", ", ".join(f"{k} {v:.2f} s" for k, v in res.stage_times.items()))
    tab.add_row("MILP", f"{res.milp_vars:,} variables, {res.milp_binaries:,} binaries, {res.milp_nodes:,} nodes")
    if res.message:
        tab.add_row("detail", res.message)
    console.print(tab)
    if result is not None:
        console.print(f"result written to {result}")


def _write_failure(path: Path, word: str, reason: str) -> None:
    """A VNN-COMP result file saying ``word`` with the reason as comment lines (``; …``)."""
    lines = [word] + ["; " + line for line in str(reason).splitlines() if line.strip()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


@app.command("verify-suite")
def verify_suite_command(
    bench_dir: Path = typer.Argument(..., metavar="DIR", help="Benchmark folder with instances.csv."),
    instances: Optional[Path] = typer.Option(None, "--instances", help="Instances CSV (onnx, vnnlib, "
                                             "timeout); default DIR/instances.csv."),
    jobs: int = typer.Option(1, "--jobs", help="Instances run in parallel (processes); 1 runs inline."),
    filter_: Optional[str] = typer.Option(None, "--filter", help="Only instances whose 'network/property' "
                                          "contains this text, e.g. 256x2 or prop_1_."),
    timeout_scale: float = typer.Option(1.0, "--timeout-scale", help="Multiply every instance's time limit."),
    max_timeout: Optional[float] = typer.Option(None, "--max-timeout", help="Cap every time limit (seconds)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per instance, replacing the "
                                            "instances file's limits (as in verify)."),
    device: str = typer.Option("cpu", "--device", help="Bound engine of branch and bound: cpu or cuda[:N]."),
    threads: int = typer.Option(1, "--threads", help="Torch threads of each instance's searches (with --jobs 1: "
                                "the machine's idle cores)."),
    precision: str = typer.Option("auto", "--precision", help="Bound engine dtype: auto (float64 on cpu, "
                                  "float32 on cuda), float64 or float32."),
    backend: str = typer.Option("highs", "--backend", help="MILP backend: highs or pyomo-<solver>."),
    out: Path = typer.Option(Path("verify_suite.csv"), "--out", help="CSV with one row per instance."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON."),
) -> None:
    """Run every instance of DIR; summarize against ground_truth.csv when present."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mipprune.cli._console import make_console
    from mipprune.verification.suite import instances_path, read_ground_truth, run_suite, summarize, summary_table

    console = make_console()
    from mipprune.verification.crown import resolve_precision
    from mipprune.verification.verify import check_threads

    check_threads(threads)   # fail once, up front, rather than in every instance
    resolve_precision(precision)
    if device != "cpu":
        from mipprune.verification.crown import resolve_device

        resolve_device(device)
    gt_file = instances_path(bench_dir, instances).parent / "ground_truth.csv"
    gt = read_ground_truth(gt_file) if gt_file.is_file() else {}
    counts = {"sat": 0, "unsat": 0, "timeout": 0, "other": 0, "wrong": 0}
    with Progress(TextColumn("[bold]verifying[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=None)

        def on_start(n: int) -> None:
            progress.update(task, total=n)

        def on_result(row) -> None:
            key = row.verdict if row.verdict in counts else "other"
            counts[key] += 1
            counts["wrong"] += int(row.wrong)
            desc = (f"sat {counts['sat']} · unsat {counts['unsat']} · timeout {counts['timeout']} · "
                    f"other {counts['other']}" + (f" · [red]WRONG {counts['wrong']}[/]" if counts["wrong"] else ""))
            progress.update(task, advance=1, description=desc)

        rows = run_suite(bench_dir, instances=instances, jobs=jobs, filter=filter_, timeout_scale=timeout_scale,
                         max_timeout=max_timeout, timeout=timeout, backend=backend, out_csv=out,
                         on_start=on_start, options={"device": device, "threads": threads, "precision": precision},
                         on_result=on_result)
    summary = summarize(rows, gt)
    console.print(summary_table(summary, title=f"{Path(bench_dir).name}: {len(rows)} instances"))
    if gt:
        console.print("competition tools: answers and raw times from ground_truth.csv, measured on the "
                      "VNN-COMP 2022 hardware; 'wrong' = sat/unsat against the consensus")
    errors = [r for r in rows if r.verdict == "error"]
    for r in errors[:5]:
        console.print(f"[red]error[/] {r.network} {r.property}: {r.message}")
    console.print(f"per-instance results written to {out}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {json_path}")
    if summary["ours"]["wrong"]:   # a wrong verdict is a bug: fail loudly (SystemExit passes through click)
        raise SystemExit(1)
