"""Sites of torch's transformer modules, torchvision's ViT / Swin and BERT-style encoders
(:mod:`mipprune.pruning.transformer_torch`).

torchvision is not a dependency: its tests import it through ``benchmarks/tv_shim.py`` from
``PYTHONPATH`` or ``/tmp/tvpkgs`` and skip when it is absent; the same code paths are exercised
without it through hand-built modules with torchvision's structure (ViT ``EncoderBlock``, Swin
blocks with modules named ``ShiftedWindowAttention(V2)``).
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mipprune.pruning.bridge import capture
from mipprune.pruning.transformer_sites import find_adapter, finish
from mipprune.pruning.transformer_torch import (BertAdapter, PrunableMultiheadAttention, PrunableTransformerEncoder,
                                                PrunableWindowAttention, TorchTransformerAdapter)
from solvers import SelectionProblem, select_channels
from solvers.errors import InvalidInputError, MipPruneError, UnsupportedLayerError

pytestmark = pytest.mark.usefixtures("one_thread")

TORCH = TorchTransformerAdapter()
BERT = BertAdapter()
E, HEADS, FF = 16, 4, 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ models
class AttnBlock(nn.Module):
    """One nn.MultiheadAttention called as self-attention with fixed call options."""

    def __init__(self, batch_first=True, bias=True, dropout=0.0, **call):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, bias=bias, dropout=dropout, batch_first=batch_first)
        self.call = call

    def forward(self, x):
        return self.attn(x, x, x, **self.call)[0]


def encoder(norm_first=False, batch_first=True, dropout=0.0, layers=2, seed=0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    # nested tensors only where torch would use them (else its constructor warns)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(E),
                                 enable_nested_tensor=batch_first and not norm_first).eval()


class ViTBlock(nn.Module):
    """torchvision's ViT EncoderBlock, hand-built (same attribute names and forward)."""

    def __init__(self):
        super().__init__()
        self.num_heads = HEADS
        self.ln_1 = nn.LayerNorm(E, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(E, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(E, FF), nn.GELU(), nn.Dropout(0.0), nn.Linear(FF, E), nn.Dropout(0.0))

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inp
        return x + self.mlp(self.ln_2(x))


def vit_like(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(ViTBlock(), ViTBlock()).eval()


class ShiftedWindowAttention(nn.Module):
    """The attributes of torchvision's Swin attention (V1), which are all ``prepare`` reads."""

    def __init__(self, dim=E, heads=2, window=(3, 3), shift=(1, 1)):
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = list(window), list(shift), heads
        self.attention_dropout, self.dropout = 0.0, 0.0
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        n_rel = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(n_rel, heads))
        area = window[0] * window[1]
        self.register_buffer("relative_position_index", torch.randint(0, n_rel, (area * area,)))

    def forward(self, x):  # pragma: no cover - only its attributes are read: prepare() swaps the module out
        raise AssertionError("the hand-built Swin attention stand-in was called: prepare() must replace it")


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """The attributes of torchvision's Swin V2 attention: per-head logit scale and position MLP."""

    def __init__(self, dim=E, heads=2, window=(3, 3), shift=(1, 1)):
        super().__init__(dim, heads, window, shift)
        del self.relative_position_bias_table
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 12), nn.ReLU(inplace=True), nn.Linear(12, heads, bias=False))
        self.register_buffer("relative_coords_table", torch.randn(1, 2 * window[0] - 1, 2 * window[1] - 1, 2))


class SwinBlock(nn.Module):
    def __init__(self, v2: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = (ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention)()
        self.mlp = nn.Sequential(nn.Linear(E, FF), nn.GELU(), nn.Dropout(0.0), nn.Linear(FF, E), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def swin_like(v2=False, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(SwinBlock(v2), SwinBlock(v2)).eval()


def bert(seed=0, cls="BertModel", **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)
    return getattr(transformers, cls)(cfg).eval()


def _out(y):
    return y if isinstance(y, torch.Tensor) else y[0]


# family → (model, calibration batches, adapter); prepared models of every family go through the
# same surgery tests
def _family(name: str):
    g = torch.Generator().manual_seed(1)
    if name == "encoder":
        return encoder(), [torch.randn(2, 6, E, generator=g) for _ in range(4)], TORCH
    if name == "vit":
        return vit_like(), [torch.randn(2, 6, E, generator=g) for _ in range(4)], TORCH
    if name in ("swin", "swin_v2"):  # 5x5 maps in 3x3 windows: padding and the shift mask are exercised
        return swin_like(v2=name == "swin_v2"), [torch.randn(2, 5, 5, E, generator=g) for _ in range(4)], TORCH
    if name == "bert":
        return bert(), [torch.randint(0, 40, (2, 7), generator=g) for _ in range(4)], BERT
    raise AssertionError(name)


FAMILIES = ["encoder", "vit", "swin", "swin_v2", "bert"]


# ----------------------------------------------------------------------------- prepare: equivalence
def _mha_calls(bf: bool):
    n, length = (3, 5) if bf else (5, 3)
    g = torch.Generator().manual_seed(3)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    per_head = torch.randn(n * HEADS, length, length, generator=g)
    return [{}, {"need_weights": False}, {"key_padding_mask": kpm}, {"key_padding_mask": kpm.float() * -1e4},
            {"attn_mask": causal}, {"attn_mask": causal, "is_causal": True, "need_weights": False},
            {"attn_mask": per_head}, {"attn_mask": per_head, "need_weights": False},
            {"key_padding_mask": kpm, "attn_mask": causal, "need_weights": False},
            {"average_attn_weights": False}]


@pytest.mark.parametrize("batch_first,bias", list(itertools.product([True, False], [True, False])))
def test_prepared_multihead_attention_matches_torch_in_every_call_mode(batch_first, bias):
    torch.manual_seed(0)
    model = AttnBlock(batch_first=batch_first, bias=bias).eval()
    prepared = TORCH.prepare(model)
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is not modified
    mine = prepared.attn
    assert isinstance(mine, PrunableMultiheadAttention) and mine.num_heads == HEADS and mine.head_dim == E // HEADS
    x = torch.randn(3, 5, E)
    for call, grad, mode in itertools.product(_mha_calls(batch_first), [True, False], ["eval", "train"]):
        model.attn.train(mode == "train"), mine.train(mode == "train")
        with torch.set_grad_enabled(grad):
            o1, w1 = model.attn(x, x, x, **call)
            o2, w2 = mine(x, x, x, **call)
        assert rel(o2, o1) < 1e-6, (call, grad, mode)
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            assert w2.shape == w1.shape and rel(w2, w1) < 1e-6
    xu = torch.randn(5, E)  # unbatched
    (o1, w1), (o2, w2) = model.attn(xu, xu, xu), mine(xu, xu, xu)
    assert o2.shape == o1.shape and rel(o2, o1) < 1e-6 and rel(w2, w1) < 1e-6


@pytest.mark.parametrize("norm_first,batch_first", list(itertools.product([False, True], [True, False])))
def test_prepared_transformer_encoder_matches_torch_in_eval_and_train(norm_first, batch_first):
    enc = encoder(norm_first, batch_first)
    prepared = TORCH.prepare(enc)
    assert type(enc) is nn.TransformerEncoder and isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(prepared, PrunableTransformerEncoder)
    assert all(isinstance(layer.self_attn, PrunableMultiheadAttention) for layer in prepared.layers)
    n, length = (3, 5) if batch_first else (5, 3)
    x = torch.randn(3, 5, E)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    calls = [{}, {"src_key_padding_mask": kpm}, {"mask": causal}, {"mask": causal, "is_causal": True},
             {"mask": causal.isinf(), "src_key_padding_mask": kpm}]
    for call, grad, mode in itertools.product(calls, [True, False], ["eval", "train"]):
        enc.train(mode == "train"), prepared.train(mode == "train")
        with torch.set_grad_enabled(grad):
            with warnings.catch_warnings():  # torch's own nested-tensor path warns (prototype API)
                warnings.simplefilter("ignore")
                want = enc(x, **call)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = prepared(x, **call)
        assert rel(got, want) < 1e-6, (call, grad, mode)
    if batch_first and not norm_first:  # torch took its nested-tensor path: zeros at padded positions
        enc.eval(), prepared.eval()
        with torch.no_grad():
            got = prepared(x, src_key_padding_mask=kpm)
        assert prepared.packs_padding and torch.equal(got[0, -2:], prepared.norm(torch.zeros(2, E)))


def test_prepared_decoder_layer_and_vit_like_blocks_match_torch():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True).eval()
    prepared = TORCH.prepare(dec)
    tgt, memory = torch.randn(2, 4, E), torch.randn(2, 6, E)
    assert rel(prepared(tgt, memory), dec(tgt, memory)) < 1e-6
    assert [s.name for s in TORCH.sites(prepared)] == ["self_attn", "multihead_attn", "linear1"]
    vit = vit_like()
    pv = TORCH.prepare(vit)
    x = torch.randn(2, 6, E)
    assert rel(pv(x), vit(x)) < 1e-6
    with torch.no_grad():
        assert rel(pv(x), vit(x)) < 1e-6


# ----------------------------------------------------------------------------------------- sites
def test_sites_are_found_with_their_sizes_in_forward_order():
    enc = TORCH.prepare(encoder())
    sites = TORCH.sites(enc)
    assert [(s.kind, s.name, s.block, s.consumer, s.n_units, s.unit_columns) for s in sites] == [
        ("heads", "layers.0.self_attn", "layers.0", "layers.0.self_attn.out_proj", HEADS, E // HEADS),
        ("neurons", "layers.0.linear1", "layers.0", "layers.0.linear2", FF, 1),
        ("heads", "layers.1.self_attn", "layers.1", "layers.1.self_attn.out_proj", HEADS, E // HEADS),
        ("neurons", "layers.1.linear1", "layers.1", "layers.1.linear2", FF, 1)]
    modules = dict(enc.named_modules())
    assert all(isinstance(modules[s.consumer], nn.Linear) and modules[s.consumer].in_features == s.n_columns
               for s in sites)
    assert np.array_equal(sites[0].column_units(), np.repeat(np.arange(HEADS), E // HEADS))
    again = pickle.loads(pickle.dumps(sites))  # plain data and functions: sites can go to other processes
    assert [(s.name, s.flops_per_unit(9), s.params_per_unit) for s in again] == [
        (s.name, s.flops_per_unit(9), s.params_per_unit) for s in sites]
    assert [w.shape for w in sites[0].producer_weights(enc)] == [(E, E)] * 3
    vit = TORCH.sites(TORCH.prepare(vit_like()))
    assert [(s.name, s.consumer, s.n_units) for s in vit] == [
        ("0.self_attention", "0.self_attention.out_proj", HEADS), ("0.mlp", "0.mlp.3", FF),
        ("1.self_attention", "1.self_attention.out_proj", HEADS), ("1.mlp", "1.mlp.3", FF)]
    swin = TORCH.sites(TORCH.prepare(swin_like(v2=True)))
    assert [(s.name, s.consumer, s.n_units, s.unit_columns, s.info["version"] if s.kind == "heads" else None)
            for s in swin[:2]] == [("0.attn", "0.attn.proj", 2, E // 2, "v2"), ("0.mlp", "0.mlp.3", FF, 1, None)]
    b = bert()
    bs = BERT.sites(BERT.prepare(b))
    assert [(s.kind, s.name, s.consumer, s.n_units, s.unit_columns) for s in bs[:2]] == [
        ("heads", "encoder.layer.0.attention", "encoder.layer.0.attention.output.dense", 4, 8),
        ("neurons", "encoder.layer.0.intermediate", "encoder.layer.0.output.dense", 48, 1)]
    assert find_adapter(b) is not None and find_adapter(b).family == "bert"
    assert find_adapter(encoder()).family == "torch" and find_adapter(swin_like()).family == "torch"
    assert find_adapter(nn.Sequential(nn.Linear(2, 2))) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_params_per_unit_counts_exactly_what_surgery_removes(family):
    model, _, adapter = _family(family)
    prepared = adapter.prepare(model)
    before = sum(p.numel() for p in prepared.parameters())
    removed = 0
    for s in adapter.sites(prepared):
        keep = np.arange(0, s.n_units, 2)
        removed += (s.n_units - keep.size) * s.params_per_unit
        s.apply(prepared, keep, None, None)
    assert removed > 0 and before - sum(p.numel() for p in prepared.parameters()) == removed


def test_flops_per_unit_counts_the_multiply_adds_surgery_removes():
    def macs(model, x):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops() // 2

    length = 7
    x = torch.randn(1, length, E)
    # heads: need_weights=True takes the explicit matmuls, which the counter sees (it skips CPU SDPA)
    torch.manual_seed(0)
    prepared = TORCH.prepare(AttnBlock(need_weights=True).eval())
    (site,) = TORCH.sites(prepared)
    before = macs(prepared, x)
    site.apply(prepared, np.array([0, 2]), None, None)
    assert before - macs(prepared, x) == 2 * site.flops_per_unit(length) * length
    assert site.flops_per_unit(2 * length) - site.flops_per_unit(length) == 2 * length * site.unit_columns
    enc = TORCH.prepare(encoder())
    before = macs(enc, x)
    mlps = [s for s in TORCH.sites(enc) if s.kind == "neurons"]
    for s in mlps:
        s.apply(enc, np.arange(5), None, None)
    assert before - macs(enc, x) == sum((FF - 5) * s.flops_per_unit(length) for s in mlps) * length


# ---------------------------------------------------------------------------------------- surgery
def _outputs(model, batches):
    with torch.no_grad():
        return [_out(model(b)) for b in batches]


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_keeping_every_unit_reproduces_the_model(family):
    model, batches, adapter = _family(family)
    prepared = adapter.prepare(model)
    want = _outputs(prepared, batches)
    if not family.startswith("swin"):  # (the hand-built Swin modules only carry torchvision's attributes)
        assert all(rel(g, w) < 1e-6 for g, w in zip(want, _outputs(model, batches)))
    for s in adapter.sites(prepared):
        s.apply(prepared, np.arange(s.n_units), None, None)
    assert all(rel(g, w) < 1e-6 for g, w in zip(_outputs(prepared, batches), want))


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_units_the_consumer_ignores_reproduces_the_model(family):
    model, batches, adapter = _family(family)
    prepared = adapter.prepare(model)
    rng = np.random.default_rng(0)
    sites = adapter.sites(prepared)
    keeps = {}
    with torch.no_grad():
        for s in sites:
            drop = rng.choice(s.n_units, s.n_units // 2, replace=False)
            cols = np.flatnonzero(np.isin(s.column_units(), drop))
            prepared.get_submodule(s.consumer).weight[:, cols] = 0.0
            keeps[s.name] = np.setdiff1d(np.arange(s.n_units), drop)
    want = _outputs(prepared, batches)
    for s in sites:
        s.apply(prepared, keeps[s.name], None, None)
    for s, after in zip(sites, adapter.sites(prepared)):
        assert after.n_units == keeps[s.name].size
    assert all(rel(g, w) < 1e-6 for g, w in zip(_outputs(prepared, batches), want))


def test_per_head_attention_masks_follow_the_kept_heads():
    torch.manual_seed(0)
    n, length = 2, 5
    mask = torch.randn(n * HEADS, length, length)
    for need_weights in (True, False):
        prepared = TORCH.prepare(AttnBlock(attn_mask=mask, need_weights=need_weights).eval())
        (site,) = TORCH.sites(prepared)
        with torch.no_grad():
            prepared.attn.out_proj.weight[:, site.column_units() == 1] = 0.0
            x = torch.randn(n, length, E)
            want = prepared(x)
            site.apply(prepared, np.array([0, 2, 3]), None, None)
            assert prepared.attn.head_index == [0, 2, 3]
            assert rel(prepared(x), want) < 1e-6


def _consumer_outputs(model, consumer, batches):
    out = []
    handle = model.get_submodule(consumer).register_forward_hook(lambda _m, _i, y: out.append(y.detach().double()))
    try:
        _outputs(model, batches)
    finally:
        handle.remove()
    return torch.cat([y.reshape(-1, y.shape[-1]) for y in out])


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstructed_weights_from_the_bridge_lower_the_error_of_not_refitting(family):
    model, batches, adapter = _family(family)
    prepared = adapter.prepare(model)
    sites = adapter.sites(prepared)
    for site in (sites[0], sites[1]):  # one heads site, one neurons site
        stats = capture(prepared, batches, layers=[site.consumer], columns_per_channel={site.consumer: 1})[site.consumer]
        problem = SelectionProblem(stats.gram, stats.cross, stats.target_sq, site.column_units(), weights=stats.weights)
        result = select_channels(problem, k=max(site.min_units, site.n_units // 2), method="greedy")
        keep = np.flatnonzero(result.mask)
        refit, plain = copy.deepcopy(prepared), copy.deepcopy(prepared)
        site.apply(refit, keep, result.weights[problem.column_mask(result.mask)], None)
        site.apply(plain, keep, None, None)
        dense = _consumer_outputs(prepared, site.consumer, batches)
        bias = prepared.get_submodule(site.consumer).bias.detach().double()
        target = float(((dense - bias) ** 2).sum())
        err = {name: float(((_consumer_outputs(m, site.consumer, batches) - dense) ** 2).sum()) / target
               for name, m in (("refit", refit), ("plain", plain))}
        # what the solver computed is what the pruned model does, and refitting helps
        assert err["refit"] == pytest.approx(result.objective, rel=1e-3, abs=1e-6)
        assert err["plain"] == pytest.approx(problem.error(result.mask, refit=False), rel=1e-3, abs=1e-6)
        assert err["refit"] < 0.9 * err["plain"], (site.name, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_trains(family):
    model, batches, adapter = _family(family)
    prepared = adapter.prepare(model)
    for s in adapter.sites(prepared):
        s.apply(prepared, np.arange(1, s.n_units, 2), None, None)
    prepared.train()
    loss = _out(prepared(batches[0])).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in prepared.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_encoder_with_dropout_trains_and_evaluates_after_pruning():
    enc = encoder(dropout=0.2)
    prepared = TORCH.prepare(enc)
    for s in TORCH.sites(prepared):
        s.apply(prepared, np.arange(0, s.n_units, 2), None, None)
    x = torch.randn(2, 6, E)
    prepared.train()
    a, b = prepared(x), prepared(x)
    assert not torch.equal(a, b)  # dropout is live in the explicit attention and the MLP
    a.sum().backward()
    assert prepared.layers[0].self_attn.q_proj.weight.grad is not None
    prepared.eval()
    with torch.no_grad():
        assert torch.equal(prepared(x), prepared(x))


def test_finish_gives_torch_modules_back_where_they_can_hold_the_result():
    enc = encoder()
    prepared = TORCH.prepare(enc)
    x = torch.randn(3, 5, E)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, -1] = True
    for s in TORCH.sites(prepared):
        if s.kind == "neurons":
            s.apply(prepared, np.arange(0, FF, 2), None, None)
    with torch.no_grad():
        want = [prepared(x, src_key_padding_mask=kpm), prepared(x)]
    done = finish(TORCH, prepared)
    assert type(done) is nn.TransformerEncoder and done.use_nested_tensor
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in done.layers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor prototype warning
        got = [done(x, src_key_padding_mask=kpm), done(x)]  # torch's fused paths, pruned MLPs
    assert all(rel(g, w) < 1e-6 for g, w in zip(got, want))
    pruned = TORCH.prepare(enc)
    TORCH.sites(pruned)[0].apply(pruned, np.array([0, 1]), None, None)
    pruned = finish(TORCH, pruned)
    assert isinstance(pruned, PrunableTransformerEncoder)
    assert isinstance(pruned.layers[0].self_attn, PrunableMultiheadAttention)
    assert type(pruned.layers[1].self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert pruned(x, src_key_padding_mask=kpm).shape == x.shape


# ------------------------------------------------------------------------------------- end to end
def test_channel_selector_prunes_a_transformer_encoder_with_reconstruction():
    from mipprune import ChannelSelector

    enc = encoder()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 6, E, generator=g) for _ in range(4)]
    selector = ChannelSelector(method="greedy", sparsity=0.5).fit(enc, batches)
    pruned = selector.prune(enc)
    plain = selector.prune(enc, reconstruct=False)
    assert type(enc) is nn.TransformerEncoder and type(enc.layers[0].self_attn) is nn.MultiheadAttention
    for layer in pruned.layers:
        assert (layer.self_attn.num_heads, layer.self_attn.out_proj.in_features, layer.linear1.out_features) == (2, 8, 12)

    def error(model):
        with torch.no_grad():
            return sum(float((model(b) - enc(b)).pow(2).sum()) for b in batches) / sum(
                float(enc(b).pow(2).sum()) for b in batches)

    assert error(pruned) < 0.6 * error(plain)  # the refitted consumers beat the same units without refit
    kpm = torch.zeros(4, 6, dtype=torch.bool)
    kpm[0, -2:] = True
    with torch.no_grad():
        assert torch.isfinite(pruned(batches[0], src_key_padding_mask=kpm)).all()
    pruned.train()
    pruned(batches[0]).sum().backward()


# ------------------------------------------------------------------------------------ BERT saving
def test_bert_pruned_non_uniformly_round_trips_through_save_pretrained(tmp_path):
    from mipprune.pruning.transformer_hf import load_pruned

    model = bert(cls="BertForSequenceClassification", num_labels=3)
    prepared = BERT.prepare(model)
    sites = BERT.sites(prepared)
    for s, keep in zip(sites, [np.array([0, 2]), np.arange(20), np.array([1, 2, 3]), np.arange(0, 48, 3)]):
        s.apply(prepared, keep, None, None)
    attn = prepared.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 16, 16)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, -2:] = 0
    with torch.no_grad():
        want = prepared(input_ids=ids, attention_mask=mask).logits
    done = finish(BERT, prepared)
    assert done.config.mipprune_layer_sizes["units"]["bert.encoder.layer.1.attention"] == 3
    assert done.config.mipprune_layer_sizes["from_pretrained"] is False
    done.save_pretrained(tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        assert rel(loaded(input_ids=ids, attention_mask=mask).logits, want) < 1e-6


def test_bert_with_uniform_mlp_and_all_heads_loads_with_stock_from_pretrained(tmp_path):
    import transformers

    prepared = BERT.prepare(bert())
    for s in BERT.sites(prepared):
        if s.kind == "neurons":
            s.apply(prepared, np.arange(0, 48, 2), None, None)
    done = finish(BERT, prepared)
    assert done.config.intermediate_size == 24 and done.config.mipprune_layer_sizes["from_pretrained"] is True
    done.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(loaded(ids).last_hidden_state, done(ids).last_hidden_state) < 1e-6


@pytest.mark.parametrize("arch", ["Roberta", "Electra"])
def test_other_bert_style_encoders_are_pruned_by_the_same_adapter(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=48, max_position_embeddings=20)
    model = getattr(transformers, f"{arch}Model")(cfg).eval()
    assert find_adapter(model).family == "bert"
    prepared = BERT.prepare(model)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(prepared(ids).last_hidden_state, model(ids).last_hidden_state) < 1e-6
    before, removed = sum(p.numel() for p in prepared.parameters()), 0
    for s in BERT.sites(prepared):
        removed += (s.n_units + 1) // 2 * s.params_per_unit
        s.apply(prepared, np.arange(1, s.n_units, 2), None, None)
    assert before - sum(p.numel() for p in prepared.parameters()) == removed
    with torch.no_grad():
        assert prepared(ids).last_hidden_state.shape == (2, 7, 32)


# ------------------------------------------------------------------------------------- bad inputs
def test_attention_that_cannot_be_pruned_is_refused_in_the_users_terms():
    class Cross(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS, **kw)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(UnsupportedLayerError, match=r"'attn' must be self-attention with kdim = vdim = embed_dim = 16.*kdim=8"):
        TORCH.prepare(Cross(kdim=8, vdim=8))
    with pytest.raises(UnsupportedLayerError, match="add_bias_kv=False"):
        TORCH.prepare(Cross(add_bias_kv=True))
    with pytest.raises(UnsupportedLayerError, match="add_zero_attn"):
        TORCH.prepare(Cross(add_zero_attn=True))

    class MyAttention(nn.MultiheadAttention):
        pass

    sub = Cross()
    sub.attn = MyAttention(E, HEADS)
    with pytest.raises(UnsupportedLayerError, match="subclass of nn.MultiheadAttention"):
        TORCH.prepare(sub)
    with pytest.raises(InvalidInputError, match="must be a torch.nn.Module"):
        TORCH.prepare("model")
    with pytest.raises(InvalidInputError, match="output of prepare"):
        TORCH.sites(encoder())


def test_bad_surgery_arguments_raise_before_anything_changes():
    prepared = TORCH.prepare(encoder())
    heads, mlp = TORCH.sites(prepared)[:2]
    snapshot = {k: v.clone() for k, v in prepared.state_dict().items()}
    d, out = heads.unit_columns, E
    bad = [((np.array([2, 1]), None, None), "sorted distinct"),
           ((np.array([0, 4]), None, None), r"in \[0, 4\)"),
           ((np.array([], dtype=int), None, None), "at least 1 unit"),
           ((np.array([0.0, 1.0]), None, None), "1-D integer array of unit indices; got shape \\(2,\\), dtype float64"),
           ((np.array([0, 1]), np.zeros((d, out)), None), rf"shape \({2 * d}, {out}\)"),
           ((np.array([0, 1]), np.full((2 * d, out), np.nan), None), "finite"),
           ((np.array([0, 1]), None, np.zeros(3)), rf"bias .* shape \({out},\)")]
    for args, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            heads.apply(prepared, *args)
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in snapshot.items())
    mlp.apply(prepared, np.arange(10), None, None)
    with pytest.raises(InvalidInputError, match="list the sites again"):
        mlp.apply(prepared, np.arange(5), None, None)
    with pytest.raises(InvalidInputError, match="prepared copy"):
        heads.apply(encoder(), np.array([0]), None, None)
    attn = prepared.layers[0].self_attn
    x = torch.randn(2, 5, E)
    with pytest.raises(InvalidInputError, match="attn_mask must be given with is_causal=True"):
        attn(x, x, x, is_causal=True)
    with pytest.raises(InvalidInputError, match=r"3-D attn_mask must have shape \(8, 5, 5\)"):
        attn(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(InvalidInputError, match=r"key_padding_mask must have shape \(2, 5\)"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert issubclass(InvalidInputError, MipPruneError)


# ------------------------------------------------------------------------------------ torchvision
@pytest.fixture(scope="module")
def torchvision():
    """torchvision through benchmarks/tv_shim.py, from PYTHONPATH or the folder it was installed aside
    in (``$MIPPRUNE_TORCHVISION_DIR``, default /tmp/tvpkgs); skip when absent."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    aside = Path(os.environ.get("MIPPRUNE_TORCHVISION_DIR", "/tmp/tvpkgs"))
    extra = [] if importlib.util.find_spec("torchvision") else [str(aside)] if (aside / "torchvision").is_dir() else None
    if extra is None:
        pytest.skip(f"torchvision is not installed (optional: pip install --no-deps --target {aside} torchvision "
                    "to run these tests)")
    shim_path = Path(__file__).resolve().parents[3] / "benchmarks" / "tv_shim.py"
    spec = importlib.util.spec_from_file_location("tv_shim", shim_path)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    sys.path[:0] = extra
    try:
        return shim.import_torchvision()
    finally:
        for p in extra:
            sys.path.remove(p)


def _check_torchvision_model(model, x):
    prepared = TORCH.prepare(model)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert rel(prepared(x), model(x)) < 1e-6
    sites = TORCH.sites(prepared)
    for s in sites:
        s.apply(prepared, np.arange(0, s.n_units, 2), None, None)
    prepared.train()
    prepared(x).sum().backward()
    prepared.eval()
    with torch.no_grad():
        assert prepared(x).shape == model(x).shape
    return sites


def test_torchvision_vit(torchvision):
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                               mlp_dim=48, num_classes=5).eval()
    sites = _check_torchvision_model(vit, torch.randn(2, 3, 16, 16))
    assert [(s.name, s.consumer, s.n_units) for s in sites[:2]] == [
        ("encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_0.self_attention.out_proj", 4),
        ("encoder.layers.encoder_layer_0.mlp", "encoder.layers.encoder_layer_0.mlp.3", 48)]


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin(torchvision, v2):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    torch.manual_seed(0)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    swin = torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[3, 3], num_classes=5, stochastic_depth_prob=0.0, **kw).eval()
    with torch.no_grad():  # torchvision initializes V1 tables near zero: make the per-head columns matter
        for m in swin.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_()
    sites = _check_torchvision_model(swin, torch.randn(2, 3, 14, 14))
    attn = [s for s in sites if s.kind == "heads"]
    assert [s.n_units for s in attn] == [2, 2, 4, 4] and all(s.info["version"] == ("v2" if v2 else "v1") for s in attn)
    assert isinstance(TORCH.prepare(swin).features[1][0].attn, PrunableWindowAttention)
