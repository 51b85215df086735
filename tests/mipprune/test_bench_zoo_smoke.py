"""benchmarks/bench_zoo.py's mipprune side runs on a hand-built block (torchvision is not needed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tests.mipprune.pruning.blocks import BLOCKS

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_zoo.py"


def test_bench_zoo_ours_prunes_a_block_and_reports_coverage(one_thread):
    spec = importlib.util.spec_from_file_location("bench_zoo", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = BLOCKS["inverted"]().eval()
    x = torch.randn(1, 3, 8, 8)
    r = bench.ours(model, x)
    assert r["groups"] == 4 and r["layers_touched"] == r["layers"] and 0 < r["flops_floor"] < 1
    with torch.no_grad():
        assert r["pruned"](x).shape == model(x).shape
    p, f = bench._count(r["pruned"], x)
    assert p < sum(t.numel() for t in model.parameters())
