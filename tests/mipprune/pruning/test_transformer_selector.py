"""ChannelSelector on Hugging Face transformers: block-by-block selection of heads and neurons."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mipprune.pruning.bridge import capture  # noqa: E402
from mipprune.pruning.selector import ChannelSelector, _fingerprint  # noqa: E402
from mipprune.pruning.transformer_selector import site_memory  # noqa: E402
from mipprune.pruning.transformer_sites import find_adapter  # noqa: E402
from solvers.errors import InfeasibleBudgetError, InvalidInputError  # noqa: E402
from solvers.selection.problem import SelectionProblem  # noqa: E402
from tests.mipprune.pruning.test_transformer_hf import logits, rel, tiny_model, tokens  # noqa: E402

ATTN0, MLP0, ATTN1, MLP1 = "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def data():
    return tokens(batches=3, batch=4, length=16)


@pytest.mark.parametrize("method", ["lasso", "exact", "greedy", "backward", "swap", "magnitude", "random",
                                    "magnitude_tp", "wanda_sp", "flap"])
def test_every_method_prunes_heads_and_neurons(method, llama, data):
    sel = ChannelSelector(method, k={ATTN0: 1, MLP0: 20, MLP1: 12}, time_limit=1.0 if method == "exact" else None)
    sel.fit(llama, data)
    rows = {r["layer"]: r for r in sel.report_rows()}
    assert {n: (r["kept"], r["total"]) for n, r in rows.items()} == {ATTN0: (1, 2), MLP0: (20, 32), MLP1: (12, 32)}
    assert rows[ATTN0]["unit"] == "kv group" and rows[MLP0]["unit"] == "neuron"
    if method == "exact":  # a certifying method reports the gap it proved
        assert all(r["bound"] is not None and r["gap"] is not None for r in rows.values())
        assert all(r["bound"] <= r["rel_error"] + 1e-9 for r in rows.values())
    if method in ("magnitude_tp", "wanda_sp", "flap"):  # baselines: no refit
        assert all(abs(r["rel_error"] - r["error_no_refit"]) < 1e-9 for r in rows.values())
    else:  # the least-squares refit never does worse than the old weights
        assert all(r["rel_error"] <= r["error_no_refit"] + 1e-9 for r in rows.values())
    pruned = sel.prune(llama)
    assert pruned.model.layers[0].self_attn.k_proj.out_features == 8
    assert pruned.model.layers[1].mlp.down_proj.in_features == 12
    if method == "flap":  # the bias compensation lands in the consumer
        assert pruned.model.layers[0].mlp.down_proj.bias is not None
    assert sel.get_support(MLP0).sum() == 20 and sel.get_support("model.layers.1.mlp.down_proj").sum() == 12
    assert torch.isfinite(logits(pruned, data[0])).all()


def test_refit_beats_the_baselines_on_the_output(llama, data):
    errs = {}
    for method in ("greedy", "magnitude_tp"):
        pruned = ChannelSelector(method, sparsity=0.5).fit(llama, data).prune(llama)
        errs[method] = rel(logits(pruned, data[0]), logits(llama, data[0]))
    assert errs["greedy"] < errs["magnitude_tp"]


def test_all_kept_selection_reproduces_the_dense_model(llama, data):
    sel = ChannelSelector("greedy", k={ATTN0: 2, MLP0: 32, ATTN1: 2, MLP1: 32}).fit(llama, data)
    assert sel.report_rows() == []
    assert rel(logits(sel.prune(llama), data[0]), logits(llama, data[0])) < 1e-6


@pytest.mark.parametrize("method", ["greedy", "magnitude"])
def test_removing_zero_weight_units_reproduces_the_outputs(method, data):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 16:] = 0      # kv group 1 (two query heads) writes nothing
            layer.mlp.down_proj.weight[:, :8] = 0          # neurons 0..7 write nothing
    sel = ChannelSelector(method, k={ATTN0: 1, ATTN1: 1, MLP0: 24, MLP1: 24}).fit(model, data)
    for name in (ATTN0, ATTN1):
        assert sel.get_support(name).tolist() == [True, False]
    for name in (MLP0, MLP1):
        assert not sel.get_support(name)[:8].any()
    assert all(r["rel_error"] < 1e-8 for r in sel.report_rows())
    held_out = tokens(batches=1, seed=7)[0]
    assert rel(logits(sel.prune(model), held_out), logits(model, held_out)) < 1e-5


def test_z_from_the_pruned_prefix_and_y_from_the_dense_model(llama, data):
    """Block 1's statistics are those of the full-model bridge on the model pruned in block 0."""
    first = ChannelSelector("greedy", k={MLP0: 20}).fit(llama, data)
    both = ChannelSelector("greedy", k={MLP0: 20, MLP1: 12}).fit(llama, data)
    st = capture(first.prune(llama), data, ["model.layers.1.mlp.down_proj"], target=llama,
                 columns_per_channel={"model.layers.1.mlp.down_proj": 1})["model.layers.1.mlp.down_proj"]
    problem = SelectionProblem(st.gram, st.cross, st.target_sq, st.groups, weights=st.weights)
    row = {r["layer"]: r for r in both.report_rows()}[MLP1]
    assert problem.error(both.get_support(MLP1)) == pytest.approx(row["rel_error"], rel=1e-6, abs=1e-9)


def test_params_budget_global_and_uniform(llama, data):
    sel = ChannelSelector("greedy", params=0.6).fit(llama, data)
    b = sel.budget_
    assert b["scope"] == "transformer blocks" and b["in_window"] and b["allocation"]["status"] == "optimal"
    counted = sum(p.numel() for layer in sel.prune(llama).model.layers for p in layer.parameters())
    dense = sum(p.numel() for layer in llama.model.layers for p in layer.parameters())
    assert counted / dense == pytest.approx(b["achieved_ratio"]) and counted / dense <= 0.6
    uni = ChannelSelector("greedy", params=0.6, allocation="uniform").fit(llama, data)
    kept = {r["layer"]: r["kept"] for r in uni.report_rows()}
    assert kept[MLP0] == kept[MLP1] and kept[ATTN0] == kept[ATTN1]
    assert uni.budget_["achieved_ratio"] <= 0.6 and uni.budget_["in_window"]   # neurons fill what heads leave
    flap = ChannelSelector("flap", params=0.6, allocation="uniform").fit(llama, data)
    pruned = flap.prune(llama)                   # its compensation biases count against the budget
    assert pruned.model.layers[0].mlp.down_proj.bias is not None
    counted = sum(p.numel() for layer in pruned.model.layers for p in layer.parameters())
    assert counted / dense == pytest.approx(flap.budget_["achieved_ratio"]) and counted / dense <= 0.6


def test_flops_budget_counts_attention_at_the_calibration_length(llama, data):
    sel = ChannelSelector("greedy", flops=0.7).fit(llama, data)
    assert sel.budget_["seq_len"] == 16 and sel.budget_["in_window"]
    assert 0.69 <= sel.budget_["achieved_ratio"] <= 0.7


def test_statistics_memory_is_bounded_and_announced(data):
    model = tiny_model("llama", mlp=64)
    sites = find_adapter(model).sites(model)
    heads_bytes = site_memory(sites[0], 32)
    assert site_memory(sites[1], 32) > heads_bytes
    sel = ChannelSelector("greedy", sparsity=0.5, max_memory=heads_bytes).fit(model, data)
    assert sel.memory_["peak_site_bytes"] <= heads_bytes
    assert set(sel.skipped_) == {MLP0, MLP1}
    assert {r["layer"] for r in sel.report_rows()} == {ATTN0, ATTN1}
    text = str(sel.report())
    assert "kept whole for memory: model.layers.0.mlp" in text and "peak statistics of one site" in text


def test_report_lists_sites_and_says_the_residual_stream_stays_whole(llama, data):
    sel = ChannelSelector("greedy", sparsity=0.5).fit(llama, data)
    text = str(sel.report())
    assert "model.layers.1.self_attn" in text and "1/2 (2/4 heads)" in text and "16/32" in text
    assert "residual stream stays whole" in text


def test_dict_batches_and_the_users_model_untouched(data):
    model = tiny_model("qwen2")
    before = _fingerprint(model)
    mask = torch.ones_like(data[0])
    mask[0, :4] = 0
    batches = [{"input_ids": data[0], "attention_mask": mask}, data[1]]
    sel = ChannelSelector("swap", sparsity=0.5).fit(model, batches)
    assert _fingerprint(model) == before
    # padding positions stay out of the statistics
    assert {r["n_samples"] for r in sel.report_rows()} == {int(mask.sum()) + data[1].numel()}
    other = copy.deepcopy(model)   # another object with the same weights: surgery replays the plan
    x = data[2]
    assert rel(logits(sel.prune(other), x), logits(sel.pruned_model_, x)) < 1e-6
    assert rel(logits(sel.prune(other, reconstruct=False), x), logits(sel.pruned_model_, x)) > 1e-4


@pytest.mark.parametrize("family", ["opt", "gpt2", "mistral"])
def test_other_families_fit_prune_and_generate(family, data):
    model = tiny_model(family)
    sel = ChannelSelector("backward", params=0.7).fit(model, data)
    pruned = sel.prune(model)
    assert sel.budget_["in_window"]
    out = pruned.generate(data[0][:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_bad_input_gets_our_errors(llama, data):
    with pytest.raises(InvalidInputError, match="token ids"):
        ChannelSelector("greedy", sparsity=0.5).fit(llama, [torch.randn(2, 8)])
    with pytest.raises(InvalidInputError, match=r"token ids in \[0, 50\)"):
        ChannelSelector("greedy", sparsity=0.5).fit(llama, [torch.full((2, 8), 99)])
    with pytest.raises(InvalidInputError, match="input_ids"):
        ChannelSelector("greedy", sparsity=0.5).fit(llama, [{"ids": data[0]}])
    with pytest.raises(InvalidInputError, match="for a transformer"):
        ChannelSelector("tecu", sparsity=0.5).fit(llama, data)
    with pytest.raises(InfeasibleBudgetError, match="params must be >= "):
        ChannelSelector("greedy", params=0.01).fit(llama, data)
    with pytest.raises(InvalidInputError, match="transformer sites"):
        ChannelSelector("greedy", k={"model.layers.0": 2}).fit(llama, data)
    with pytest.raises(InvalidInputError, match=r"k\['model.layers.0.mlp'\] must satisfy 1 <= k <= 32"):
        ChannelSelector("greedy", k={MLP0: 40}).fit(llama, data)
    with pytest.raises(InvalidInputError, match="allocation must be"):
        ChannelSelector("greedy", params=0.5, allocation="per-layer")
    sel = ChannelSelector("greedy", sparsity=0.5).fit(llama, data)
    with pytest.raises(InvalidInputError, match="must be a llama transformer"):
        sel.prune(tiny_model("gpt2"))
    with pytest.raises(InvalidInputError, match="heads and neurons of the fitted one"):
        sel.prune(tiny_model("llama", kv_heads=4))
    with pytest.raises(InvalidInputError, match="transformer site"):
        sel.get_support("lm_head")


def test_cli_prunes_a_model_folder_on_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from mipprune.cli import app
    from mipprune.pruning.transformer_hf import load_pruned

    words = [f"w{i}" for i in range(45)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "dense"
    tiny_model("llama").save_pretrained(folder)
    rng = np.random.default_rng(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(rng.choice(words, 600)))
    runner = CliRunner()
    res = runner.invoke(app, ["prune", "--model", str(folder), "--text", str(text), "--seq-len", "32"])
    assert res.exit_code != 0 and "tokenizer" in str(res.exception)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", "--model", str(folder), "--text", str(text), "--seq-len", "32",
                              "--method", "greedy", "--params", "0.6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "residual stream stays whole" in res.output
    back = load_pruned(out)
    assert sum(p.numel() for p in back.model.layers.parameters()) < sum(
        p.numel() for p in load_pruned(folder).model.layers.parameters())


def test_cli_prunes_a_pickled_causal_lm_on_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from mipprune.cli import app

    words = [f"w{i}" for i in range(45)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tok_dir)
    dense = tiny_model("llama")
    before = [p.detach().clone() for p in dense.parameters()]
    path = tmp_path / "lm.pt"
    torch.save(dense, path)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 600)))
    runner = CliRunner()
    # byte-level reading needs a vocabulary of at least 256 tokens: told, with the way out
    res = runner.invoke(app, ["prune", "--model", str(path), "--text", str(text), "--seq-len", "32"])
    assert res.exit_code != 0 and "--tokenizer" in str(res.exception)
    lin = tmp_path / "lin.pt"
    torch.save(torch.nn.Linear(3, 3), lin)
    res = runner.invoke(app, ["prune", "--model", str(lin), "--text", str(text), "--tokenizer", str(tok_dir)])
    assert res.exit_code != 0 and "token ids" in str(res.exception) and "Linear" in str(res.exception)
    out = tmp_path / "pruned.pt"
    res = runner.invoke(app, ["prune", "--model", str(path), "--text", str(text), "--tokenizer", str(tok_dir),
                              "--seq-len", "32", "--method", "greedy", "--params", "0.6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output
    back = torch.load(out, weights_only=False)
    assert sum(p.numel() for p in back.model.layers.parameters()) < sum(
        p.numel() for p in dense.model.layers.parameters())
    with torch.no_grad():
        assert back(torch.randint(3, 48, (1, 8))).logits.shape[-1] == dense.config.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(before, torch.load(path, weights_only=False).parameters()))


# ------------------------------------------------------------------ a family of our own: the contract alone
class _ToyBlock(torch.nn.Module):
    def __init__(self, d: int = 16, n: int = 12):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(d), torch.nn.Linear(d, n), torch.nn.Linear(n, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _Toy(torch.nn.Module):
    """Three residual MLP blocks; a Linear between blocks 0 and 1, so block 1 is not chained."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.merge = torch.nn.Linear(4, 16), torch.nn.Linear(16, 16)
        self.blocks = torch.nn.ModuleList([_ToyBlock() for _ in range(3)])

    def forward(self, x):
        h = self.merge(self.blocks[0](self.embed(x)))
        return self.blocks[2](self.blocks[1](h))


class _ToyAdapter:
    family = "toy"

    def matches(self, model):
        return isinstance(model, _Toy)

    def prepare(self, model):
        return copy.deepcopy(model)

    def sites(self, prepared):
        from functools import partial

        from mipprune.pruning.transformer_sites import Site

        return [Site("neurons", f"blocks.{i}", f"blocks.{i}", f"blocks.{i}.down", b.up.out_features, 1,
                     2 * 16 + 1, lambda T: 32, partial(_toy_apply, i=i)) for i, b in enumerate(prepared.blocks)]


def _toy_apply(prepared, keep, weight, bias, *, i):
    from mipprune.pruning.transformer_hf import _slice_cols, _slice_rows, _unit_index

    rows = _unit_index(keep, 1)
    _slice_rows(prepared, f"blocks.{i}.up", rows)
    _slice_cols(prepared, f"blocks.{i}.down", rows, weight, bias)


def test_blocks_that_are_not_chained_are_reached_through_the_whole_model(monkeypatch):
    import mipprune.pruning.transformer_sites as ts

    real = ts.find_adapter
    monkeypatch.setattr(ts, "find_adapter", lambda m: _ToyAdapter() if isinstance(m, _Toy) else real(m))
    toy = _Toy().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 5, 4, generator=g) for _ in range(2)]
    first = ChannelSelector("greedy", k={"blocks.0": 6}).fit(toy, batches)
    both = ChannelSelector("greedy", k={"blocks.0": 6, "blocks.1": 5}).fit(toy, batches)
    assert both.memory_["mode"] == "whole model"
    st = capture(first.prune(toy), batches, ["blocks.1.down"], target=toy,
                 columns_per_channel={"blocks.1.down": 1})["blocks.1.down"]
    problem = SelectionProblem(st.gram, st.cross, st.target_sq, st.groups, weights=st.weights)
    row = {r["layer"]: r for r in both.report_rows()}["blocks.1"]
    assert problem.error(both.get_support("blocks.1")) == pytest.approx(row["rel_error"], rel=1e-6, abs=1e-9)


def test_offloading_blocks_to_the_device_gives_the_same_selection(llama, data):
    """``device`` other than the model's moves one block at a time (``cpu:0`` exercises it on any machine)."""
    here = ChannelSelector("greedy", sparsity=0.5).fit(llama, data)
    moved = ChannelSelector("greedy", sparsity=0.5, device="cpu:0").fit(llama, data)
    assert moved.memory_["mode"] == "block-by-block, offloaded"
    for name in (ATTN0, MLP0, ATTN1, MLP1):
        assert (here.get_support(name) == moved.get_support(name)).all()
    assert rel(logits(moved.prune(llama), data[0]), logits(here.prune(llama), data[0])) < 1e-6


@pytest.mark.gpu
def test_a_cpu_model_pruned_block_by_block_on_cuda(llama, data):
    here = ChannelSelector("greedy", params=0.6).fit(llama, data)
    cuda = ChannelSelector("greedy", params=0.6, device="cuda").fit(llama, data)
    assert cuda.memory_["mode"] == "block-by-block, offloaded"
    assert next(cuda.prune(llama).parameters()).device.type == "cpu"
    assert cuda.budget_["in_window"]
    dense = logits(llama, data[0])   # float64 statistics on either device: the same quality (widths may differ)
    assert rel(logits(cuda.prune(llama), data[0]), dense) <= 1.5 * rel(logits(here.prune(llama), data[0]), dense) + 1e-3


def test_each_block_gets_its_own_arguments(data):
    """Qwen2 with a sliding window from layer 1 on: layer 1's mask differs from layer 0's, and its
    statistics are those of the full model's own forward."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=50, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    sel = ChannelSelector("greedy", k={MLP1: 12}).fit(model, data)
    name = "model.layers.1.mlp.down_proj"
    st = capture(model, data, [name], columns_per_channel={name: 1})[name]
    problem = SelectionProblem(st.gram, st.cross, st.target_sq, st.groups, weights=st.weights)
    assert problem.error(sel.get_support(MLP1)) == pytest.approx(sel.report_rows()[0]["rel_error"], rel=1e-6, abs=1e-9)
