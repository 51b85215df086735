"""Streamed calibration (truncated forwards from cached cuts, dense targets recorded once) against
the full-forward path of the group driver and the budget's error curves, on the hand-built blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mipprune.data import make_loader
from mipprune.pruning.bridge import capture
from mipprune.pruning.channel_graph import build_channel_graph
from mipprune.pruning.group_pruning import (_advance_within, group_curves, group_targets, prune_by_groups,
                                            statistics_bytes)
from mipprune.pruning.streaming import CachedForward, record_target_rows
from solvers.errors import InvalidInputError
from tests.mipprune.pruning.blocks import BLOCKS, BottleneckWide, MixedWide, ResNetTiny

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = dict(BLOCKS, wide=BottleneckWide, mixed=MixedWide)


def _data(n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 8, 8, generator=g) for _ in range(n_batches)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streamed_driver_matches_full_forwards(name):
    model = MODELS[name]().eval()
    data = _data()
    graph = build_channel_graph(model, data[0][:1])
    targets = group_targets(graph.prunable, sparsity=0.5)
    kw = dict(method="greedy", positions=3, graph=graph, max_samples=40)
    full = prune_by_groups(model, data, data[0][:1], targets, streamed=False, **kw)
    fast = prune_by_groups(model, data, data[0][:1], targets, **kw)
    assert set(fast.masks) == set(full.masks)
    for g in full.masks:
        np.testing.assert_array_equal(fast.masks[g], full.masks[g])
    for g, row in full.rows.items():
        assert row["calibration"] == "full forwards"
        assert fast.rows[g]["calibration"].startswith("streamed from")
        assert fast.rows[g]["n_samples"] == row["n_samples"]
        for c, err in row["consumer_errors"].items():
            assert fast.rows[g]["consumer_errors"][c] == pytest.approx(err, rel=1e-9, abs=1e-12)
    fs, ss = full.model.state_dict(), fast.model.state_dict()
    assert fs.keys() == ss.keys()
    for k in fs:
        torch.testing.assert_close(ss[k], fs[k], rtol=1e-6, atol=1e-7)


def test_cache_moves_past_finished_blocks_and_runs_only_what_a_capture_needs():
    model = ResNetTiny().eval()
    data = _data()
    stream, why = CachedForward.create(model, data, data[0][:1])
    assert stream is not None and why == ""
    names = [stream.nodes[c].name for c in stream.cuts]
    # the input, the stem and each block's output: one live tensor; nothing inside a block (the skip is live)
    assert names[0] == "x" and "relu" in names and "layer1_0_relu_1" in names
    assert not any(n.startswith("layer1_0_conv") or n.startswith("layer1_0_bn") for n in names)
    calls = []
    handle = model.fc.register_forward_hook(lambda *_: calls.append(1))
    try:
        stop = stream.stop_index(["layer1.1.conv1"])
        stream.advance(stream.cut_before(stop))
        assert stream.nodes[stream.cut].name == "layer1_0_relu_1"
        assert stream.cache_bytes == 15 * 6 * 8 * 8 * 4  # images × channels × H × W × float32
        assert stream.estimated_bytes(stream.cut) == stream.cache_bytes
        with torch.no_grad():
            part = stream.forward(1, data[1], stream.index[next(n for n in stream.nodes
                                                                 if n.name == "layer1_1_relu_1")])
            ref = model.layer1(torch.relu(model.bn1(model.conv1(data[1]))))
        assert not calls  # truncated: the classifier never ran
    finally:
        handle.remove()
    torch.testing.assert_close(part, ref)
    with pytest.raises(InvalidInputError, match="same batches"):
        stream.forward(0, data[1], stop)
    # the pruned copy traces to the same nodes: the cache carries over
    pruned = prune_by_groups(model, data, data[0][:1], {build_channel_graph(model, data[0][:1]).prunable[-1].name: 3},
                             method="greedy", positions=2).model
    assert stream.rebind(pruned) and stream.cut > 0


def test_cache_is_counted_and_dropped_when_it_does_not_fit():
    model = BottleneckWide().eval()
    data = _data()
    stream, _ = CachedForward.create(model, data, data[0][:1])
    last = stream.cuts[-1]
    need = stream.estimated_bytes(last)
    assert need > 0
    _advance_within(stream, last, need - 1)  # too small for the last cut: an earlier one that fits
    assert stream.cut < last and stream.cache_bytes <= need - 1
    _advance_within(stream, last, need)
    assert stream.cut == last and stream.cache_bytes <= need
    _advance_within(stream, last, 0)  # nothing fits: dropped, batches run from the input
    assert stream.cut == 0 and stream.cache is None and stream.cache_bytes == 0

    graph = build_channel_graph(model, data[0][:1])
    targets = group_targets(graph.prunable, sparsity=0.5)
    kw = dict(method="greedy", positions=3, graph=graph)
    free = prune_by_groups(model, data, data[0][:1], targets, **kw)
    assert any(r["calibration"] != "streamed from x" for r in free.rows.values())
    assert free.rows["block.conv1"]["calibration"] == "streamed from relu"
    # a cap that holds the largest group's statistics and the recorded targets (~40 kB) but not the
    # cache at the stem's ReLU (15 images × 32 × 8 × 8 float32 = 122,880 B) beside them
    assert stream.estimated_bytes(stream.index[next(n for n in stream.nodes if n.name == "relu")]) == 122_880
    cap = statistics_bytes(model, next(g for g in graph.prunable if g.name == "block.conv1")) + 60_000
    tight = prune_by_groups(model, data, data[0][:1], targets, max_memory=cap, **kw)
    assert tight.rows["block.conv1"]["calibration"] == "streamed from x"  # recomputed from the input
    assert tight.rows["block.conv2"]["calibration"] == "streamed from relu"  # small statistics: the cache fits
    for g in free.masks:
        np.testing.assert_array_equal(tight.masks[g], free.masks[g])
        for c, err in free.rows.get(g, {}).get("consumer_errors", {}).items():
            assert tight.rows[g]["consumer_errors"][c] == pytest.approx(err, rel=1e-9, abs=1e-12)


def test_recorded_targets_equal_a_dense_forward_beside():
    model = MixedWide().eval()
    data = _data()
    graph = build_channel_graph(model, data[0][:1])
    g = graph.prunable[0]
    cut = prune_by_groups(model, data, data[0][:1], {g.name: g.n_units // 2}, method="greedy", positions=3,
                          streamed=False).model
    names = ["expand.0", "head", "fc"]
    rows = record_target_rows(model, data, names, positions=3, max_samples=50, seed=4)
    channels = {"expand.0": np.arange(48)}
    ref = capture(cut, data, names, positions=3, max_samples=50, seed=4, target=model, target_channels=channels)
    got = capture(cut, data, names, positions=3, max_samples=50, seed=4, target_rows=rows, target_channels=channels)
    for n in names:
        np.testing.assert_allclose(got[n].cross, ref[n].cross, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[n].gram, ref[n].gram, rtol=1e-12, atol=1e-12)
        assert got[n].target_sq == pytest.approx(ref[n].target_sq, rel=1e-12) and got[n].n_samples == ref[n].n_samples
    with pytest.raises(InvalidInputError, match="target and target_rows"):
        capture(cut, data, names, target=model, target_rows=rows)


def test_curves_streamed_match_and_a_shuffling_loader_falls_back(monkeypatch):
    advanced = []
    real = CachedForward.advance
    monkeypatch.setattr(CachedForward, "advance", lambda self, cut: advanced.append(cut) or real(self, cut))
    model = BottleneckWide().eval()
    data = _data()
    graph = build_channel_graph(model, data[0][:1])
    sizes = sorted(statistics_bytes(model, g) for g in graph.prunable)
    for cap in (None, sizes[-1] + sizes[0]):  # one pass; several passes with a cache advanced between them
        full = group_curves(model, data, graph, positions=3, max_memory=cap, streamed=False)
        fast = group_curves(model, data, graph, positions=3, max_memory=cap)
        assert all(np.isfinite(c).all() for c in full.values())
        assert fast.keys() == full.keys()
        for k in full:
            np.testing.assert_allclose(fast[k], full[k], rtol=1e-9, atol=1e-12)
    assert any(c > 0 for c in advanced)  # with the cap, later passes start from a cached cut
    loader = make_loader(torch.cat(data), batch_size=5, shuffle=True)
    stream, why = CachedForward.create(model, loader, data[0][:1])
    assert stream is None and "different batches" in why
    out = prune_by_groups(model, loader, data[0][:1], group_targets(graph.prunable, sparsity=0.5),
                          method="greedy", positions=3, graph=graph)
    assert {r["calibration"] for r in out.rows.values()} == {"full forwards"}


def test_greedy_by_consumer_blocks_equals_the_dense_path():
    from mipprune.pruning.joint import group_problem
    from solvers.selection import greedy

    model = BottleneckWide().eval()
    data = _data()
    graph = build_channel_graph(model, data[0][:1])
    g = next(x for x in graph.prunable if len(x.consumers) > 1)  # the stem: block.conv1 and the downsample
    stats = capture(model, data, [m.module for m in g.consumers], positions=3)
    problem = group_problem(g, stats)
    w = greedy.whiten(problem)
    state = greedy._forward_state(w)
    assert isinstance(state, greedy._BlockForward) and len(state.states) == len(g.consumers)
    dense = greedy.ForwardState(w)
    for _ in range(g.n_units):
        a, b = state.gains(), dense.gains()
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        pick = int(np.argmax(b))
        state.add(pick)
        dense.add(pick)
        assert state.explained == pytest.approx(dense.explained, rel=1e-10, abs=1e-14)


def test_skip_last_fires_the_pre_hooks_of_the_last_consumer_but_does_not_run_it():
    model = ResNetTiny().eval()
    data = _data()
    stream, _ = CachedForward.create(model, data, data[0][:1])
    stop = stream.stop_index(["layer1.0.conv2"])
    conv = model.get_submodule("layer1.0.conv2")
    seen = {"pre": 0, "ran": 0}
    handles = [conv.register_forward_pre_hook(lambda *_: seen.__setitem__("pre", seen["pre"] + 1)),
               conv.register_forward_hook(lambda *_: seen.__setitem__("ran", seen["ran"] + 1))]
    try:
        stream.runner(stop, skip_last=True)(0, data[0])
        assert seen == {"pre": 1, "ran": 0}
        stream.runner(stop)(0, data[0])
        assert seen == {"pre": 2, "ran": 1}
    finally:
        for h in handles:
            h.remove()
    assert not conv._forward_pre_hooks  # the stopper is removed again
