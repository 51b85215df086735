"""The CLI's rough edges: -h/--version, tables at full width when piped, one-line errors, no warnings."""
from __future__ import annotations

import warnings

import pytest

import mipprune
from tests.mipprune.conftest import run_cli


def _run_raw(argv, capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys, raw=True)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    code, out, _ = _run_raw([flag], capsys)
    assert code == 0 and out.strip() == f"mipprune {mipprune.__version__}"


@pytest.mark.parametrize("argv", [["-h"], ["prune", "-h"], ["verify", "-h"], ["verify-suite", "-h"],
                                  ["experiment", "-h"]])
def test_short_help_on_the_program_and_every_command(argv, capsys):
    code, out, err = _run_raw(argv, capsys)
    assert code == 0 and "Usage: mipprune" in out and "No such option" not in out + err
    assert "--help" in out and "-h" in out


@pytest.fixture
def no_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)   # an explicit COLUMNS would (rightly) set the width


def test_piped_prune_prints_whole_tables_and_no_warnings(no_columns, capsys, tmp_path):
    """The default method (lasso) end to end, as `mipprune prune | cat` sees it: no cell cut to `…`,
    no line wrapped at 80 columns, and no third-party warning (any warning is an error here)."""
    import json

    js = tmp_path / "run.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = _run_raw(["prune", "--epochs", "1", "--positions", "4", "--json", str(js)], capsys)
    assert code == 0, err
    assert "…" not in out
    assert any(ln.startswith("Selecting channels: method=lasso, sparsity=0.5, sequential calibration on ")
               and ln.rstrip().endswith(" images") for ln in out.splitlines())   # one line, not wrapped
    lines = out.splitlines()
    for r in json.loads(js.read_text())["layers"]:
        row = next(ln for ln in lines if ln.startswith(f"│ {r['layer']} "))
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[2] == f"{r['kept']}/{r['total']}" and cells[-1] == r["status"] == "feasible"
    assert any("no refit" in ln for ln in lines) and any("accuracy (mask only, old weights)" in ln for ln in lines)


def test_errors_are_one_unwrapped_line(no_columns, capsys):
    path = "/nonexistent/" + "a-rather-long-folder-name/" * 4 + "model.pt"
    code, out, err = _run_raw(["prune", "--model", path], capsys)
    assert code == 2
    assert err.strip() == f"error: --model must be an existing file; got {path!r}"
