"""``mipprune`` command line: one module per command group, all registered on one Typer app.

Project errors (``MipPruneError``) are shown as one red line and exit code 2, not a traceback.
"""
from __future__ import annotations

import sys

from mipprune.cli._app import app

# Each module below adds its commands to ``app`` when imported.
from mipprune.cli import prune as _prune  # noqa: E402,F401
from mipprune.cli import verify as _verify  # noqa: E402,F401
from mipprune.cli import experiment as _experiment  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from mipprune.cli._console import print_error
    from solvers.errors import MipPruneError

    try:
        # Non-standalone mode returns typer.Exit's code instead of exiting: pass it on.
        code = app(args=argv, standalone_mode=False, prog_name="mipprune")
    except MipPruneError as exc:
        print_error(str(exc))
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors (bad option values) arrive here in non-standalone mode. Typer vendors its own
        # click, so match on click's exception protocol rather than on the class.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code != 0:
        sys.exit(code)


__all__ = ["app", "main"]
