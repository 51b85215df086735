"""The README's torch-free API example runs as printed and says what the README says it says."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_selection_example_runs_and_exact_is_proven_best():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "solvers.select_channels" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines()}
    assert rows["exact"][1] == "optimal"
    exact, greedy, lasso = (float(rows[m][2]) for m in ("exact", "greedy", "lasso"))
    bound = float(rows["exact"][3])
    assert bound <= exact <= greedy + 1e-12 and exact <= lasso + 1e-12
