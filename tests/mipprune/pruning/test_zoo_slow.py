"""The torchvision zoo (opt-in: ``--run-slow``; needs torchvision installed aside, see below).

torchvision's PyPI wheel does not import beside this environment's CPU torch (``operator
torchvision::nms does not exist``): ``benchmarks/tv_shim.py`` skips the fake-kernel registration
of the missing compiled ops while importing it. Install with
``pip install --no-deps --target DIR torchvision`` and run with ``PYTHONPATH=DIR``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mipprune.pruning.channel_graph import build_channel_graph
from mipprune.pruning.group_budget import group_cost, measure_cost
from mipprune.pruning.group_surgery import prune_groups

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "mnasnet0_5", "regnet_y_400mf", "squeezenet1_0", "densenet121", "shufflenet_v2_x0_5", "vgg11_bn", "alexnet"]


@pytest.fixture(scope="module")
def torchvision():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install --no-deps --target DIR torchvision; PYTHONPATH=DIR)")
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "tv_shim.py"
    spec = importlib.util.spec_from_file_location("tv_shim", path)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    return shim.import_torchvision()


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_has_groups_prunes_runs_and_counts_exactly(name, torchvision):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = build_channel_graph(model, x)
    assert len(graph.prunable) >= 7
    rng = np.random.default_rng(0)
    masks, widths = {}, {}
    for g in graph.prunable:
        keep = np.zeros(g.n_units, dtype=bool)
        keep[rng.choice(g.n_units, max(1, g.n_units // 2), replace=False)] = True
        masks[g.id], widths[g.name] = keep, int(keep.sum())
    with torch.no_grad():
        same = prune_groups(model, graph, {g.id: np.ones(g.n_units, bool) for g in graph.prunable}, example_input=x)
        torch.testing.assert_close(same(x), model(x), rtol=1e-6, atol=1e-6)
        pruned = prune_groups(model, graph, masks, example_input=x)
        assert pruned(x).shape == (1, 10)
    cost = group_cost(model, graph, x, "flops")
    assert cost.cost(widths) == measure_cost(pruned, x, "flops")
    assert cost.floor() < 0.05
