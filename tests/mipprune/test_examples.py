"""Smoke tests: the examples run as scripts, finish, and print sensible accuracies."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str) -> str:
    # One thread per process: the examples are tiny and the test machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _accuracy(text: str, label: str) -> float:
    m = re.search(rf"^{re.escape(label)}: ([01]\.\d+)$", text, re.MULTILINE)
    assert m, f"no line {label!r} in output:\n{text}"
    return float(m.group(1))


def test_quickstart_prunes_and_reconstruction_helps():
    out = _run("quickstart.py")
    dense = _accuracy(out, "dense accuracy")
    masked = _accuracy(out, "pruned accuracy without reconstruction")
    rebuilt = _accuracy(out, "pruned accuracy with reconstruction")
    assert dense >= 0.95 and rebuilt > masked and rebuilt >= dense - 0.05
    before, after = map(int, re.search(r"^parameters: (\d+) -> (\d+)$", out, re.MULTILINE).groups())
    assert after < before / 2


def test_custom_model_example_uses_k_per_layer():
    out = _run("custom_model.py")
    assert "Conv2d(1, 8," in out and "Conv2d(8, 12," in out  # k={"conv2": 8, "fc1": 12}
    dense, pruned = _accuracy(out, "dense accuracy"), _accuracy(out, "pruned accuracy")
    assert dense >= 0.95 and pruned >= dense - 0.05
    assert _accuracy(out, "fine-tuned accuracy") >= 0.9


@pytest.mark.parametrize("name", ["quickstart.py", "custom_model.py"])
def test_examples_have_docstrings_saying_how_to_run(name):
    assert f"python examples/{name}" in (EXAMPLES / name).read_text()
