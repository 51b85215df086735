"""Hugging Face site adapters: sites per family, surgery, generate, save / load (tiny configs, no downloads)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mipprune.pruning.transformer_hf import SIZES_FIELD, load_pruned  # noqa: E402
from mipprune.pruning.transformer_sites import find_adapter, finish  # noqa: E402
from solvers.errors import InvalidInputError  # noqa: E402

VOCAB = 50
FAMILIES = ("llama", "qwen2", "mistral", "opt", "gpt2")


def tiny_model(family: str, *, layers: int = 2, kv_heads: int = 2, seed: int = 0, mlp: int = 32):
    """A randomly initialised causal LM of ``family``: hidden 32, 4 heads of 8, MLP width ``mlp``."""
    torch.manual_seed(seed)
    t = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "qwen2", "mistral"):
        cfg_cls, cls = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
                        "mistral": (t.MistralConfig, t.MistralForCausalLM)}[family]
        cfg = cfg_cls(hidden_size=32, intermediate_size=mlp, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, **common)
    elif family == "opt":
        cfg, cls = t.OPTConfig(hidden_size=32, ffn_dim=mlp, num_attention_heads=4, word_embed_proj_dim=32,
                               max_position_embeddings=64, pad_token_id=0, **common), t.OPTForCausalLM
    else:
        cfg, cls = t.GPT2Config(n_embd=32, n_head=4, n_layer=layers, n_inner=mlp, vocab_size=VOCAB, n_positions=64,
                                bos_token_id=1, eos_token_id=2), t.GPT2LMHeadModel
    return cls(cfg).eval()


def tokens(batches: int = 2, batch: int = 4, length: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, length), generator=g) for _ in range(batches)]


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_per_family(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    assert adapter is not None and adapter.family == {"qwen2": "llama", "mistral": "llama"}.get(family, family)
    prepared = adapter.prepare(model)
    x = tokens()[0]
    assert rel(logits(prepared, x), logits(model, x)) < 1e-6
    sites = adapter.sites(prepared)
    assert [s.kind for s in sites] == ["heads", "neurons"] * 2
    heads, mlp = sites[0], sites[1]
    if family in ("llama", "qwen2", "mistral"):  # GQA: a unit is a kv head with its 2 query heads
        assert (heads.n_units, heads.unit_columns, heads.info["unit"]) == (2, 16, "kv group")
    else:
        assert (heads.n_units, heads.unit_columns, heads.info["unit"]) == (4, 8, "head")
    assert (mlp.n_units, mlp.unit_columns) == (32, 1)
    mods = dict(prepared.named_modules())
    assert all(isinstance(mods[s.consumer], torch.nn.Linear) for s in sites)
    assert heads.n_columns == mods[heads.consumer].in_features
    # params_per_unit is exact: one unit fewer in every site removes exactly that many parameters
    before = sum(p.numel() for p in prepared.parameters())
    for s in sites:
        s.apply(prepared, np.arange(1, s.n_units), None, None)
    after = sum(p.numel() for p in prepared.parameters())
    assert before - after == sum(s.params_per_unit for s in sites)


def test_mha_llama_units_are_heads():
    heads = find_adapter(tiny_model("llama", kv_heads=4)).sites(tiny_model("llama", kv_heads=4))[0]
    assert (heads.n_units, heads.unit_columns, heads.info["unit"]) == (4, 8, "head")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_kept_surgery_is_the_identity(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    prepared = adapter.prepare(model)
    for s in adapter.sites(prepared):
        w = prepared.get_submodule(s.consumer).weight.detach().double().T.numpy()  # bridge layout
        s.apply(prepared, np.arange(s.n_units), w, None)
    out = finish(adapter, prepared)
    x = tokens()[0]
    assert rel(logits(out, x), logits(model, x)) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_generates_and_round_trips(family, tmp_path):
    model = tiny_model(family)
    adapter = find_adapter(model)
    prepared = adapter.prepare(model)
    for i, s in enumerate(adapter.sites(prepared)):  # different widths per layer
        s.apply(prepared, np.arange(max(1, s.n_units - 1 - i // 2)), None, None)
    pruned = finish(adapter, prepared)
    x = tokens()[0]
    out = pruned.generate(x[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    pruned.save_pretrained(tmp_path)
    sizes = getattr(transformers.AutoConfig.from_pretrained(tmp_path), SIZES_FIELD)
    assert sizes["from_pretrained"] is False and len(sizes["units"]) == 4
    back = load_pruned(tmp_path)
    # per-layer widths: re-classed as a subclass of the family's class (same layout), found by the adapters
    assert isinstance(back, type(model)) and type(back).__name__ == "Mippruned" + type(model).__name__
    assert find_adapter(back) is not None
    assert rel(logits(back, x), logits(pruned, x)) < 1e-6
    # the stock loader rebuilds it too, from the loader file save_pretrained wrote beside the weights
    assert (tmp_path / "hf_pruned.py").is_file()
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert rel(logits(stock, x), logits(pruned, x)) < 1e-6
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in pruned.parameters())
    buf = io.BytesIO()  # and it pickles (the re-classed model's class is importable by name)
    torch.save(pruned, buf)
    buf.seek(0)
    assert rel(logits(torch.load(buf, weights_only=False), x), logits(pruned, x)) < 1e-6


def test_uniform_llama_loads_with_from_pretrained(tmp_path):
    model = tiny_model("llama")
    adapter = find_adapter(model)
    prepared = adapter.prepare(model)
    for s in adapter.sites(prepared):
        s.apply(prepared, np.arange(1) if s.kind == "heads" else np.arange(0, 32, 2), None, None)
    pruned = finish(adapter, prepared)
    cfg = pruned.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (1, 2, 8, 16)
    pruned.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = tokens()[0]
    assert rel(logits(back, x), logits(pruned, x)) < 1e-6


def test_load_pruned_says_what_is_missing(tmp_path):
    with pytest.raises(InvalidInputError, match="config.json"):
        load_pruned(tmp_path)


def test_surgery_rejects_bad_keep():
    model = tiny_model("opt")
    adapter = find_adapter(model)
    prepared = adapter.prepare(model)
    heads = adapter.sites(prepared)[0]
    with pytest.raises(InvalidInputError, match="sorted distinct"):
        heads.apply(prepared, np.array([2, 1]), None, None)
    with pytest.raises(InvalidInputError, match="at least 1"):
        heads.apply(prepared, np.array([], dtype=np.int64), None, None)
