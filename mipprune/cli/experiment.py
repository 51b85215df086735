"""``mipprune experiment``: dense vs pruned adversarial MILPs (see :mod:`mipprune.experiments`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mipprune.cli._app import app


@app.command("experiment")
def experiment(
    config: Annotated[Optional[Path], typer.Argument(
        help="TOML config (sections as in mipprune/configs/default.toml); default: the embedded one.")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output folder (re-running resumes it).")] = Path("runs/experiment"),
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", help="Parallel queries (default: the config's run.jobs).")] = None,
    executor: Annotated[Optional[str], typer.Option("--executor", help="local (process pool) or ray.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Toy-sized run (the config's quick.* tables).")] = False,
    time_limit: Annotated[Optional[float], typer.Option(
        "--time-limit", help="Seconds per query (overrides the config).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Train MLPs, prune them, and time the adversarial-example MILP on dense vs pruned networks."""
    from mipprune.cli._console import make_console
    from mipprune.experiment.report import headline_table, headline_text, results_table
    from mipprune.experiment.config import load_config
    from mipprune.experiment.run import run_experiment

    overrides = {k: v for k, v in (("jobs", jobs), ("executor", executor), ("time_limit", time_limit)) if v is not None}
    cfg = load_config(config, quick=quick, overrides=overrides)
    console = make_console()   # logs and pipes: the wide table at its own width, not 80 columns
    console.print(f"[bold]mipprune experiment[/] → {out}  ({cfg.jobs} job(s), executor {cfg.executor}, "
                  f"{len(cfg.architectures)} architecture(s) × {len(cfg.methods)} method(s) × "
                  f"{len(cfg.sparsities)} sparsit{'y' if len(cfg.sparsities) == 1 else 'ies'})")
    res = run_experiment(cfg, out, progress=progress, console=console)
    console.print(results_table(res))
    console.print(headline_text(res).replace("**", ""))
    if res.headline and res.headline.get("best"):
        console.print(headline_table(res))
    console.print(f"[dim]{res.n_run} queries run, {res.n_skipped} resumed; {res.wall_time:.0f} s. "
                  f"Report: {res.files.get('report')}[/]")
