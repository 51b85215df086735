"""The README's PyTorch examples run as printed and print what the README says they print."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if marker in b)


def _run(code: str) -> tuple[str, dict]:
    out, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    return out.getvalue(), scope


def test_readme_quick_torch_example_prunes_to_the_flops_budget():
    out, scope = _run(_block("ChannelSelector(method=\"exact\", flops=0.5"))
    sel, model, pruned = scope["sel"], scope["model"], scope["pruned"]
    assert 0.995 * 0.5 - 1e-9 <= sel.budget_["achieved_ratio"] <= 0.5 + 1e-9
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    for r in sel.report_rows():     # every layer carries a proven bound below its error
        assert r["bound"] is not None and r["bound"] <= r["rel_error"] + 1e-12


@pytest.mark.filterwarnings("error")   # no third-party warning on the README's paths
def test_readme_more_api_example_runs_and_says_what_it_claims():
    out, scope = _run(_block("finetune(tecu.prune(model)"))
    exact, tecu = scope["exact"], scope["tecu"]
    # `print(exact.report())` prints a readable table, not `<rich.table.Table object at 0x…>`
    assert "<rich.table" not in out and "Channel selection (method exact" in out
    lines = out.splitlines()
    assert any([c.strip() for c in ln.split("┃")[1:4]] == ["layer", "type", "kept"] for ln in lines)
    for r in exact.report_rows():
        assert r["status"] in ("optimal", "time_limit")
        if r["status"] == "optimal":
            assert r["gap"] <= 0.01 + 1e-12
        row = next(ln for ln in lines if ln.startswith(f"│ {r['layer']} "))
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[:3] == [r["layer"], r["type"], f"{r['kept']}/{r['total']}"] and cells[-1] == r["status"]
    hist = [h["objective"] for h in tecu.tecu_history_]
    assert all(b <= a for a, b in zip(hist, hist[1:]))
    assert 0.995 * 0.5 - 1e-9 <= tecu.budget_["achieved_ratio"] <= 0.5 + 1e-9
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("highs ", "cpsat "))}
    assert "optimal" in lines["highs"] and "optimal" in lines["cpsat"]
    assert lines["highs"].split("}")[0] == lines["cpsat"].split("}")[0].replace("cpsat", "highs")
