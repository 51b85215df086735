"""The Typer application object shared by the command modules of ``mipprune.cli``."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="mipprune",
    help="Prune neural networks by solving for the channels to keep, then verify them as MILPs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},   # inherited by every command
)


def _show_version(value: bool) -> None:
    if value:
        from mipprune import __version__

        typer.echo(f"mipprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_show_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Prune neural networks by solving for the channels to keep, then verify them as MILPs."""
    # A root callback keeps every command a subcommand (Typer runs a lone command as the program).
