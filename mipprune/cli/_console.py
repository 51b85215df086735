"""The one place where the commands make their rich consoles.

On a terminal rich fits output to the window. Piped or logged output has no window: rich would
assume 80 columns and squeeze tables into ``lay…`` / ``16/…`` cells and wrap long lines. There the
consoles print at the width the output needs instead (unless ``COLUMNS`` is set explicitly).
"""
from __future__ import annotations

import os

# "As wide as needed": tables are not expanded, so they keep their natural width; only text lines
# longer than this would wrap.
UNBOUNDED_WIDTH = 100_000


def make_console(*, stderr: bool = False, **kwargs):
    """A ``rich.console.Console`` for a command's output (``stderr=True`` for errors)."""
    from rich.console import Console

    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=UNBOUNDED_WIDTH, **kwargs)
    return console


def print_error(message: str) -> None:
    """One red ``error:`` line on stderr, never wrapped by rich (the terminal wraps it, if anything)."""
    make_console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)


__all__ = ["make_console", "print_error", "UNBOUNDED_WIDTH"]
