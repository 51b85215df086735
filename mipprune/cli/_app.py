"""The Typer application object shared by the command modules of ``mipprune.cli``."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="mipprune",
    help="Prune neural networks by solving for the channels to keep, then verify them as MILPs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Prune neural networks by solving for the channels to keep, then verify them as MILPs."""
    # A root callback keeps every command a subcommand (Typer runs a lone command as the program).
