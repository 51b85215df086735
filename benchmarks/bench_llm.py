"""Structured pruning of a small LLaMA trained on the Python standard library: held-out perplexity.

Issue 14's benchmark. A LLaMA-style causal LM (transformers' ``LlamaForCausalLM`` built from a
``LlamaConfig``: 4 layers, d = 256, 8 heads, SwiGLU intermediate 688, byte-level vocabulary of 256
bytes + BOS/EOS/PAD, so no tokenizer is downloaded) is trained for ``--train-minutes`` on the ``*.py``
files of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``, without
site-/dist-packages); files whose CRC-32 of the relative path is 0 mod 10 are held out for evaluation.
The trained weights are cached under ``benchmarks/out/bench_llm_cache/<key>/`` (key = hash of the
model config, the training arguments and the corpus), so reruns skip training.

Then 20 %, 30 % and 50 % of the transformer blocks' parameters are removed (attention heads and MLP
neurons; the residual stream stays whole) and the held-out perplexity is measured with no
fine-tuning, for:

* ours — ``ChannelSelector(method, params=1 − ratio)`` (default ``allocation="global"``: per-site
  widths from the budget MILP over greedy error curves) with lasso (at ``--lasso-ratios`` only: it is
  the slowest here), greedy, swap (greedy + swaps) and exact (per-site time limit
  ``--exact-time-limit``; the worst proven gap is reported), when the transformer integration
  (``mipprune/pruning/transformer_selector.py``) recognises the model; otherwise (or with
  ``--pipeline bench``) this script's own block-by-block pipeline runs the same solvers: per layer,
  statistics of the output projection's and down projection's inputs on the already-pruned prefix,
  ``solvers.select_channels`` on ``SelectionProblem(G, G W, tr(WᵀGW))``, least-squares refit;
* ``ours:swap (uniform)`` — the same swap search through this script's pipeline with the baselines'
  uniform widths: selection + reconstruction alone, without our allocation;
* baselines magnitude_tp / wanda_sp / flap (:mod:`mipprune.pruning.transformer_criteria`), block by
  block with uniform per-layer widths that hit the parameter budget (``plan_widths``: heads removed =
  round(ratio · heads), the rest of the block's share from the MLP), top-k by score, no refit, FLAP
  with its bias compensation (``--baselines-via selector`` sends them through ChannelSelector
  instead); ``flap (AL-AM)`` — FLAP as published, with its standardized global comparison of heads
  and neurons across layers (non-uniform widths) and bias compensation;
* Torch-Pruning 1.6.1 itself (``BasePruner`` + ``GroupMagnitudeImportance(p=2)``, whole heads,
  the same uniform widths; embeddings and LM head ignored so the residual stream stays whole; from
  ``--tp-path``, default /tmp/tvpkgs, after ``benchmarks/tv_shim.py``).

Time is wall-clock seconds of fit + prune (calibration included). Memory is the peak resident set
size above the level at the start of the method (``/proc/self/statm`` sampled every 5 ms, after
``malloc_trim``): it includes torch activations and the float64 statistics.

``--scaling`` also times our selection on randomly initialised LLaMAs of growing width and
intermediate size (statistics memory per block measured and computed), the basis of the 7 B
extrapolation in the README notes.

    nice -n 5 .venv/bin/python benchmarks/bench_llm.py [--train-minutes 6] [--threads 2]
        [--ratios 0.2 0.3 0.5] [--methods lasso greedy swap exact swap_uniform magnitude_tp wanda_sp flap flap_alam tp]
        [--scaling] [--only-scaling]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import threading
import time
import warnings
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "out"

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
OURS = ("lasso", "greedy", "swap", "exact")
BASELINES = ("magnitude_tp", "wanda_sp", "flap")
ALL_METHODS = (*OURS, "swap_uniform", *BASELINES, "flap_alam", "tp")
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------- data
def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    return root, files


def is_held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 10 == 0


def load_corpus() -> dict:
    """Byte tokens of the stdlib sources: each file is BOS + bytes + EOS; train / held-out streams."""
    root, files = stdlib_files()
    digest = hashlib.sha256()
    parts = {"train": [], "eval": []}
    n_files = {"train": 0, "eval": 0}
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError:
            continue
        digest.update(rel.encode() + b"\0" + data)
        split = "eval" if is_held_out(rel) else "train"
        parts[split].append(np.concatenate([[BOS], np.frombuffer(data, dtype=np.uint8), [EOS]]).astype(np.int16))
        n_files[split] += 1
    return {"train": np.concatenate(parts["train"]), "eval": np.concatenate(parts["eval"]), "hash": digest.hexdigest(),
            "files": n_files, "root": str(root)}


def windows(stream: np.ndarray, starts: np.ndarray, length: int):
    import torch

    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def random_batches(stream: np.ndarray, n_seqs: int, length: int, batch: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, len(stream) - length - 1, n_seqs))
    x = windows(stream, starts, length)
    return list(x.split(batch))


def eval_batches(stream: np.ndarray, n_seqs: int, length: int, batch: int) -> list:
    """``n_seqs`` windows spread evenly over the held-out stream (deterministic)."""
    starts = np.linspace(0, len(stream) - length - 1, n_seqs).astype(np.int64)
    return list(windows(stream, starts, length).split(batch))


# ------------------------------------------------------------------------------------------ model
def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, use_cache=False,
                       tie_word_embeddings=False)


def block_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def train_model(model, stream: np.ndarray, *, minutes: float, batch: int, seq_len: int, lr: float, seed: int) -> dict:
    """AdamW on random windows for a wall-clock budget; warmup then cosine decay over the budget."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, warmup = minutes * 60.0, 10
    model.train()
    t0, step, tokens, losses = time.perf_counter(), 0, 0, []
    with Progress(TextColumn("train"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("train", total=budget, info="")
        while (elapsed := time.perf_counter() - t0) < budget:
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / budget)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            x = windows(stream, rng.integers(0, len(stream) - seq_len - 1, batch), seq_len)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step, tokens = step + 1, tokens + x.numel()
            losses.append(loss.item())
            bar.update(task, completed=min(elapsed, budget), info=f"step {step} loss {np.mean(losses[-20:]):.3f}")
    model.eval()
    return {"steps": step, "tokens": tokens, "train_s": time.perf_counter() - t0,
            "final_train_loss": float(np.mean(losses[-20:])) if losses else None}


def trained_model(args, corpus: dict):
    """The cached trained model for (config, training arguments, corpus), training it on a miss."""
    from transformers import LlamaForCausalLM

    import torch

    cfg = llama_config(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.seq_len)
    train_args = {"minutes": args.train_minutes, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                  "seed": args.seed}
    key_src = json.dumps({"config": cfg.to_dict(), "train": train_args, "data": corpus["hash"],
                          "torch": torch.__version__.split("+")[0], "v": CACHE_VERSION}, sort_keys=True, default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    folder = Path(args.cache_dir) / key
    if (folder / "meta.json").exists():
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        meta = json.loads((folder / "meta.json").read_text())
        meta["cached"] = True
        return model, meta, key
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    meta = train_model(model, corpus["train"], minutes=args.train_minutes, batch=args.batch, seq_len=args.seq_len,
                       lr=args.lr, seed=args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    meta.update(train_args=train_args)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return model, meta, key


def perplexity(model, batches: list) -> float:
    """exp(mean next-token NLL) over every predicted position of the held-out windows."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x in batches:
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + x[:, 1:].numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident set size above the level at entry (bytes), sampled every ``interval`` s."""

    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        import gc

        gc.collect()
        try:  # hand freed heap back to the OS so the delta is not hidden by earlier, larger peaks
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.start
        return False


# ------------------------------------------------------------------ integration (ChannelSelector)
def integration_status(model) -> tuple[bool, str]:
    """Whether ChannelSelector prunes this HF LLaMA (the transformer integration of issue 14)."""
    if not (REPO / "mipprune" / "pruning" / "transformer_selector.py").exists():
        return False, "mipprune/pruning/transformer_selector.py not present"
    try:
        from mipprune.pruning.transformer_selector import fit_transformer  # noqa: F401
        from mipprune.pruning.transformer_sites import find_adapter

        adapter = find_adapter(model)
    except Exception as exc:  # a module mid-edit must not kill the benchmark
        return False, f"integration not importable: {type(exc).__name__}: {exc}"
    if adapter is None:
        return False, "find_adapter returned None for LlamaForCausalLM"
    if "fit_transformer" not in (REPO / "mipprune" / "pruning" / "selector.py").read_text():
        return False, "ChannelSelector.fit does not dispatch to fit_transformer yet"
    return True, f"adapter {getattr(adapter, 'family', type(adapter).__name__)}"


def prune_selector(model, method: str, ratio: float, calib: list, args) -> tuple:
    from mipprune.pruning.selector import ChannelSelector

    kw = {"time_limit": args.exact_time_limit} if method == "exact" else {}
    allocation = args.baseline_allocation if method in BASELINES else args.ours_allocation
    sel = ChannelSelector(method, params=1.0 - ratio, allocation=allocation, **kw).fit(model, calib)
    pruned = sel.prune(model)
    results = getattr(sel, "results_", None) or {}
    solve_s = {name: float(getattr(res, "solve_time", float("nan"))) for name, res in results.items()}
    kept = {name: int(getattr(res, "k", 0) or 0) for name, res in results.items()}
    site_gaps = {name: float(res.gap) for name, res in results.items() if getattr(res, "gap", None) is not None}
    statuses = [str(getattr(res.status, "value", res.status)) for res in results.values()
                if getattr(res, "status", None) is not None]
    info = {"worst_gap": max(site_gaps.values()) if site_gaps else None, "statuses": sorted(set(statuses)),
            "allocation": allocation, "solve_s": solve_s, "kept": kept, "site_gaps": site_gaps}
    return pruned, info


# ------------------------------------------------------------------------- this script's pipeline
def plan_widths(model, ratio: float) -> dict:
    """Uniform per-layer widths removing ≈ ``ratio`` of every block's parameters: heads (kv groups)
    removed = round(ratio · groups), the rest of the block's share from the MLP neurons."""
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    d = cfg.hidden_size
    per_group = d * hd * (2 * q_per_kv + 2)  # q rows and o columns of its q heads, k and v rows
    per_neuron = 3 * d
    groups, neurons = cfg.num_key_value_heads, cfg.intermediate_size
    total = groups * per_group + neurons * per_neuron
    drop_g = min(groups - 1, round(ratio * groups))
    drop_n = int(np.clip(round((ratio * total - drop_g * per_group) / per_neuron), 0, neurons - 1))
    return {"groups_keep": groups - drop_g, "neurons_keep": neurons - drop_n, "hd": hd, "q_per_kv": q_per_kv}


def layer_sites(model, layer_index: int, plan: dict) -> list:
    from mipprune.pruning.transformer_sites import Site

    cfg, prefix = model.config, f"model.layers.{layer_index}"
    layer = model.model.layers[layer_index]
    groups = layer.self_attn.k_proj.out_features // plan["hd"]
    neurons = layer.mlp.down_proj.in_features
    noop = lambda *a: None  # noqa: E731 - surgery is done by _slice_* below
    return [
        Site("heads", f"{prefix}.self_attn", prefix, f"{prefix}.self_attn.o_proj", groups, plan["hd"] * plan["q_per_kv"],
             cfg.hidden_size * plan["hd"] * (2 * plan["q_per_kv"] + 2), lambda L: 0, noop),
        Site("neurons", f"{prefix}.mlp", prefix, f"{prefix}.mlp.down_proj", neurons, 1, 3 * cfg.hidden_size,
             lambda L: 0, noop),
    ]


def _linear(weight, bias):
    import torch
    from torch import nn

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _apply(layer, site, keep: np.ndarray, new_weight, new_bias, plan: dict) -> None:
    """Remove the units not in ``keep`` from a LLaMA layer; write the consumer's weight / bias."""
    import torch

    cols = torch.from_numpy(np.flatnonzero(np.repeat(np.isin(np.arange(site.n_units), keep), site.unit_columns)))
    if site.kind == "heads":
        attn, hd = layer.self_attn, plan["hd"]
        kv_rows = torch.from_numpy(np.concatenate([np.arange(u * hd, (u + 1) * hd) for u in keep]))
        attn.q_proj = _linear(attn.q_proj.weight.detach()[cols], None if attn.q_proj.bias is None else attn.q_proj.bias.detach()[cols])
        for name in ("k_proj", "v_proj"):
            lin = getattr(attn, name)
            setattr(attn, name, _linear(lin.weight.detach()[kv_rows], None if lin.bias is None else lin.bias.detach()[kv_rows]))
        consumer_owner, consumer_name = attn, "o_proj"
    else:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            setattr(mlp, name, _linear(lin.weight.detach()[cols], None if lin.bias is None else lin.bias.detach()[cols]))
        consumer_owner, consumer_name = mlp, "down_proj"
    consumer = getattr(consumer_owner, consumer_name)
    w = consumer.weight.detach()[:, cols] if new_weight is None else torch.from_numpy(new_weight.T).float()
    b = consumer.bias.detach() if consumer.bias is not None else None
    if new_bias is not None:
        b = torch.from_numpy(new_bias).float() + (0 if b is None else b)
    setattr(consumer_owner, consumer_name, _linear(w, b))


def capture(model, layers: list[int], batches: list) -> dict:
    """Per layer index: float64 ZᵀZ, column means and rows of the inputs of its o_proj and down_proj."""
    import torch

    stats = {}

    def hook(key):
        def fn(module, inputs, output):
            z = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            s = stats.setdefault(key, {"gram": torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64),
                                       "sum": torch.zeros(z.shape[1], dtype=torch.float64), "n": 0})
            s["gram"] += z.T @ z
            s["sum"] += z.sum(0)
            s["n"] += z.shape[0]
        return fn

    handles = []
    for i in layers:
        layer = model.model.layers[i]
        handles += [layer.self_attn.o_proj.register_forward_hook(hook((i, "heads"))),
                    layer.mlp.down_proj.register_forward_hook(hook((i, "neurons")))]
    try:
        with torch.no_grad():
            for x in batches:
                model.model(input_ids=x)  # the decoder only: the LM head is not needed for statistics
    finally:
        for h in handles:
            h.remove()
    out = {}
    for (i, kind), v in stats.items():
        out.setdefault(i, {})[kind] = {"gram": v["gram"].numpy(), "mean": (v["sum"] / v["n"]).numpy(), "n": v["n"]}
    return out


def _consumer(layer, kind: str):
    return layer.self_attn.o_proj if kind == "heads" else layer.mlp.down_proj


def prune_pipeline(model, method: str, ratio: float, calib: list, args) -> tuple:
    """Block by block: statistics on the pruned prefix, select per site, cut, move to the next block."""
    from mipprune.pruning.transformer_criteria import TRANSFORMER_CRITERIA, flap_bias, unit_scores
    from solvers import SelectionProblem, select_channels

    pruned = copy.deepcopy(model)
    plan = plan_widths(pruned, ratio)
    gaps, statuses, errors = [], [], []
    for i, layer in enumerate(pruned.model.layers):
        stats = capture(pruned, [i], calib)[i]
        for site in layer_sites(pruned, i, plan):
            k = plan["groups_keep"] if site.kind == "heads" else plan["neurons_keep"]
            W = _consumer(layer, site.kind).weight.detach().double().T.numpy()
            st = stats[site.kind]
            new_w = new_b = None
            if method in TRANSFORMER_CRITERIA:
                scores = unit_scores(method, site, weight=W, gram=st["gram"], mean=st["mean"], n_samples=st["n"])
                keep = np.sort(np.argsort(-scores, kind="stable")[:k])
                if method == "flap":
                    new_b = flap_bias(site, keep, W, st["mean"])
            else:
                G = st["gram"]
                B = G @ W
                problem = SelectionProblem(G, B, float(np.sum(W * B)), site.column_units())
                limit = {"exact": args.exact_time_limit, "swap": args.swap_time_limit}.get(method)
                res = select_channels(problem, k=k, method=method, time_limit=limit)
                keep = np.flatnonzero(res.mask)
                new_w = res.weights[np.repeat(res.mask, site.unit_columns)]
                statuses.append(str(res.status))
                errors.append(float(res.objective))
                if res.gap is not None:
                    gaps.append(float(res.gap))
            _apply(layer, site, keep, new_w, new_b, plan)
    pruned.config.num_attention_heads = plan["groups_keep"] * plan["q_per_kv"]
    pruned.config.num_key_value_heads = plan["groups_keep"]
    pruned.config.head_dim = plan["hd"]
    pruned.config.intermediate_size = plan["neurons_keep"]
    info = {"worst_gap": max(gaps) if gaps else None, "statuses": sorted(set(statuses)),
            "worst_layer_error": max(errors) if errors else None, "plan": plan}
    return pruned, info


def prune_flap_alam(model, ratio: float, calib: list, args) -> tuple:
    """FLAP as published (An et al., AAAI 2024; structure "AL-AM", metric WIFV, bias compensation).

    Statistics of every consumer on the dense model; per column ``Var(X_j)·‖W_j‖²`` (squared for the
    attention output projection, as the reference code does), standardized per layer and module
    type (:func:`~mipprune.pruning.transformer_criteria.standardize`), averaged over a head's columns;
    heads and neurons of all layers sorted together and kept, best first, until the kept parameters
    reach ``1 − ratio`` (a head weighs its parameters over a neuron's); at least one unit per site.
    """
    from mipprune.pruning.transformer_criteria import flap_bias, standardize

    pruned = copy.deepcopy(model)
    plan = plan_widths(pruned, 0.0)
    n_layers = len(pruned.model.layers)
    stats = capture(pruned, list(range(n_layers)), calib)
    sites = [layer_sites(pruned, i, plan) for i in range(n_layers)]
    metrics = {"heads": [], "neurons": []}
    for i, layer in enumerate(pruned.model.layers):
        for site in sites[i]:
            st, W = stats[i][site.kind], _consumer(layer, site.kind).weight.detach().double().T.numpy()
            col = np.clip(np.diag(st["gram"]) / st["n"] - st["mean"] ** 2, 0, None) * np.einsum("jm,jm->j", W, W)
            col = standardize(col ** 2 if site.kind == "heads" else col)
            metrics[site.kind].append(col.reshape(site.n_units, -1).mean(axis=1))
    heads, neurons = np.stack(metrics["heads"]), np.stack(metrics["neurons"])
    head_site, neuron_site = sites[0]
    scores = np.concatenate([heads.ravel(), neurons.ravel()])
    weights = np.concatenate([np.full(heads.size, head_site.params_per_unit / neuron_site.params_per_unit),
                              np.ones(neurons.size)])
    order = np.argsort(-scores, kind="stable")
    n_keep = int(np.argmin(np.abs(np.cumsum(weights[order]) - (1 - ratio) * weights.sum())))
    kept = np.zeros(scores.size, dtype=bool)
    kept[order[:n_keep]] = True
    head_keep, neuron_keep = kept[:heads.size].reshape(heads.shape), kept[heads.size:].reshape(neurons.shape)
    for i, layer in enumerate(pruned.model.layers):
        for site, mask, score in ((head_site, head_keep[i], heads[i]), (neuron_site, neuron_keep[i], neurons[i])):
            if not mask.any():
                mask[np.argmax(score)] = True
            keep = np.flatnonzero(mask)
            W = _consumer(layer, site.kind).weight.detach().double().T.numpy()
            _apply(layer, site, keep, None, flap_bias(site, keep, W, stats[i][site.kind]["mean"]), plan)
    widths = {"heads": head_keep.sum(axis=1).tolist(), "neurons": neuron_keep.sum(axis=1).tolist()}
    pruned.config.intermediate_size = max(widths["neurons"])  # non-uniform: the config can only say the max
    return pruned, {"worst_gap": None, "statuses": [], "widths": widths}


# -------------------------------------------------------------------------------- Torch-Pruning
def prune_torch_pruning(model, ratio: float, calib: list, args) -> tuple:
    """Torch-Pruning's magnitude pruner on whole heads and MLP neurons (residual stream kept)."""
    if args.tp_path not in sys.path:
        sys.path.insert(0, args.tp_path)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tv_shim import import_torchvision

    import_torchvision()  # transformers may import torchvision lazily: make it importable first
    import torch_pruning as tp
    from transformers.models.llama.modeling_llama import LlamaAttention

    pruned = copy.deepcopy(model)
    plan = plan_widths(pruned, ratio)  # the same uniform widths as this script's pipeline
    cfg = pruned.config
    head_ratio = (cfg.num_key_value_heads - plan["groups_keep"]) / cfg.num_key_value_heads
    mlp_ratio = (cfg.intermediate_size - plan["neurons_keep"]) / cfg.intermediate_size
    num_heads = {}
    for m in pruned.modules():
        if isinstance(m, LlamaAttention):
            num_heads[m.q_proj] = pruned.config.num_attention_heads
            num_heads[m.k_proj] = pruned.config.num_key_value_heads
            num_heads[m.v_proj] = pruned.config.num_key_value_heads
    pruner = tp.pruner.BasePruner(
        pruned, example_inputs=calib[0][:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=mlp_ratio, ignored_layers=[pruned.lm_head, pruned.model.embed_tokens], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio - 1e-9, global_pruning=False)
    pruner.step()
    for m in pruned.modules():  # tell the config and the attention modules the new sizes
        if isinstance(m, LlamaAttention):
            m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features
    layer0 = pruned.model.layers[0]
    pruned.config.num_attention_heads = layer0.self_attn.q_proj.out_features // layer0.self_attn.head_dim
    pruned.config.num_key_value_heads = layer0.self_attn.k_proj.out_features // layer0.self_attn.head_dim
    pruned.config.intermediate_size = layer0.mlp.gate_proj.out_features
    return pruned, {"worst_gap": None, "statuses": []}


# ------------------------------------------------------------------------------------------- runs
def run_one(label: str, fn, dense_params: int, eval_set: list) -> dict:
    row = {"method": label}
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            pruned, info = fn()
            row["time_s"] = time.perf_counter() - t0
        row["peak_mb"] = mem.delta / 2**20
        row["params_kept"] = block_params(pruned) / dense_params
        row["ppl"] = perplexity(pruned, eval_set)
        row.update(info)
    except Exception as exc:  # one failing method is a row with its reason, not a lost run
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return row


def scaling(args) -> list[dict]:
    """Selection time and statistics memory of ours on random LLaMAs of growing width / intermediate."""
    import torch
    from transformers import LlamaForCausalLM

    rows = []
    rng_stream = np.random.default_rng(7).integers(0, 256, 200_000).astype(np.int16)
    for hidden, inter in args.scaling_widths:
        torch.manual_seed(0)
        cfg = llama_config(hidden, 1, max(1, hidden // 32), max(1, hidden // 32), inter, args.seq_len)
        model = LlamaForCausalLM(cfg).eval()
        calib = random_batches(rng_stream, args.calib_seqs, args.seq_len, args.calib_batch, seed=3)
        stats_bytes = 8 * (hidden * hidden + hidden * hidden + inter * inter + inter * hidden)  # G and B per site
        for method in args.scaling_methods:
            fn = (lambda m=method: prune_selector(model, m, 0.3, calib, args)) if args.use_selector else \
                (lambda m=method: prune_pipeline(model, m, 0.3, calib, args))
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                _, info = fn()
                dt = time.perf_counter() - t0
            solve = info.get("solve_s", {})
            rows.append({"hidden": hidden, "intermediate": inter, "method": method, "time_s": dt,
                         "mlp_solve_s": sum(v for k, v in solve.items() if k.endswith("mlp")),
                         "attn_solve_s": sum(v for k, v in solve.items() if k.endswith("self_attn")),
                         "peak_mb": mem.delta / 2**20, "stats_mb_computed": stats_bytes / 2**20,
                         "worst_gap": info.get("worst_gap"), "tokens": args.calib_seqs * args.seq_len,
                         "kept": info.get("kept"), "site_gaps": info.get("site_gaps")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def gqa_check(args) -> dict:
    """Grouped-query attention (2 kv heads for 8 query heads) on a random-init LLaMA of the same size:
    pruned by our greedy to 70 % of the block parameters, then it must still run and generate."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.hidden, 2, args.heads, 2, args.intermediate, args.seq_len)
    model = LlamaForCausalLM(cfg).eval()
    stream = np.random.default_rng(5).integers(0, 256, 100_000).astype(np.int16)
    calib = random_batches(stream, 16, args.seq_len, args.calib_batch, seed=6)
    fn = prune_selector if args.use_selector else prune_pipeline
    row = {"kv_heads": 2, "heads": args.heads, "method": "greedy", "ratio": 0.3}
    try:
        pruned, _ = fn(model, "greedy", 0.3, calib, args)
        row["params_kept"] = block_params(pruned) / block_params(model)
        row["kv_heads_kept"] = [layer.self_attn.k_proj.out_features // pruned.config.head_dim if getattr(
            pruned.config, "head_dim", None) else None for layer in pruned.model.layers]
        with torch.no_grad():
            out = pruned.generate(calib[0][:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        row["generates"] = tuple(out.shape) == (1, 12)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(row), flush=True)
    return row


def print_scaling(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Scaling of ours (ChannelSelector, params=0.7) on a 1-block random LLaMA")
    for col in ("hidden d", "intermediate", "method", "time s", "MLP solve s", "attn solve s", "peak MB",
                "stats MB (G, B, computed)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["hidden"]), str(r["intermediate"]), r["method"], f"{r['time_s']:.1f}",
                      f"{r['mlp_solve_s']:.1f}", f"{r['attn_solve_s']:.1f}", f"{r['peak_mb']:.0f}",
                      f"{r['stats_mb_computed']:.1f}")
    Console(width=170).print(table)


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def print_table(rows: list[dict], dense_ppl: float, title: str, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="\n".join(notes), caption_justify="left")
    for col in ("prune", "method", "params kept", "ppl", "Δppl", "×dense", "time s", "peak MB", "worst gap", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in rows:
        ppl = r.get("ppl")
        table.add_row(f"{r['ratio']:.0%}" if r.get("ratio") else "—", r["method"], fmt(r.get("params_kept"), ".3f"),
                      fmt(ppl, ".3f"), fmt(None if ppl is None else ppl - dense_ppl, "+.3f"),
                      fmt(None if ppl is None else ppl / dense_ppl, ".2f"), fmt(r.get("time_s"), ".1f"),
                      fmt(r.get("peak_mb"), ".0f"), fmt(r.get("worst_gap"), ".3f"), r.get("error", r.get("note", "")))
    Console(width=170).print(table)


def checks(rows: list[dict], dense_ppl: float) -> list[dict]:
    out = []
    by = {(r.get("ratio"), r["method"]): r for r in rows if r.get("ppl") is not None}

    def best(ratio, names):
        cands = [(by[(ratio, m)]["ppl"], m) for m in names if (ratio, m) in by]
        return min(cands) if cands else (None, None)

    ours30, m30 = best(0.3, [f"ours:{m}" for m in OURS])
    base30, b30 = best(0.3, [*BASELINES, "flap (AL-AM)", "torch-pruning"])
    if ours30 is not None and base30 is not None:
        ok = ours30 - dense_ppl <= 0.5 * (base30 - dense_ppl)
        out.append({"check": "30 %: our Δppl ≤ ½ best baseline's Δppl", "ours": m30, "ours_dppl": ours30 - dense_ppl,
                    "baseline": b30, "baseline_dppl": base30 - dense_ppl, "pass": bool(ok)})
    ours50, m50 = best(0.5, [f"ours:{m}" for m in OURS])
    if ours50 is not None:
        out.append({"check": "50 %: our ppl ≤ 2 × dense ppl", "ours": m50, "ours_ppl": ours50, "dense_ppl": dense_ppl,
                    "ratio": ours50 / dense_ppl, "pass": bool(ours50 <= 2 * dense_ppl)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8, help="< heads for grouped-query attention")
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-seqs", type=int, default=16, help="calibration windows (from the training files)")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--eval-seqs", type=int, default=48, help="held-out windows for perplexity")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--exact-time-limit", type=float, default=5.0, help="seconds per site for exact")
    parser.add_argument("--swap-time-limit", type=float, default=20.0,
                        help="seconds per site for swap in this script's pipeline (ours:swap (uniform))")
    parser.add_argument("--pipeline", choices=("auto", "selector", "bench"), default="auto",
                        help="auto: ChannelSelector when the transformer integration recognises the model")
    parser.add_argument("--ours-allocation", choices=("global", "uniform"), default="global",
                        help="ChannelSelector allocation of our methods (global: budget MILP over error curves)")
    parser.add_argument("--baseline-allocation", choices=("global", "uniform"), default="uniform",
                        help="allocation of the criteria baselines (uniform per site, as Wanda-sp / TP prune)")
    parser.add_argument("--baselines-via", choices=("pipeline", "selector"), default="pipeline",
                        help="criteria baselines through this script's pipeline (uniform widths at the exact "
                             "budget) or through ChannelSelector (--baseline-allocation)")
    parser.add_argument("--lasso-ratios", type=float, nargs="*", default=[0.3],
                        help="ratios at which lasso runs (it is the slowest of ours here)")
    parser.add_argument("--only-scaling", action="store_true", help="skip the perplexity table")
    parser.add_argument("--tp-path", default="/tmp/tvpkgs")
    parser.add_argument("--scaling", action="store_true", help="also time ours on wider random LLaMAs")
    parser.add_argument("--scaling-widths", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                        default=[(256, 688), (512, 1376), (1024, 2752)], help="HIDDENxINTERMEDIATE")
    parser.add_argument("--scaling-methods", nargs="+", default=["greedy", "swap"])
    parser.add_argument("--cache-dir", default=str(OUT / "bench_llm_cache"))
    parser.add_argument("--out", default=str(OUT / "bench_llm.json"))
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
    t_start = time.perf_counter()
    corpus = load_corpus()
    print(f"corpus: {corpus['files']['train']} train / {corpus['files']['eval']} held-out files, "
          f"{len(corpus['train']):,} / {len(corpus['eval']):,} byte tokens from {corpus['root']}", flush=True)
    model, meta, key = trained_model(args, corpus)
    print(f"model {key}: {'cached' if meta['cached'] else 'trained'}; {meta['steps']} steps, {meta['tokens']:,} tokens, "
          f"{meta['train_s']:.0f} s, final train loss {meta['final_train_loss']:.3f}", flush=True)
    if args.train_only:
        return
    calib = random_batches(corpus["train"], args.calib_seqs, args.seq_len, args.calib_batch, seed=args.seed + 1)
    eval_set = eval_batches(corpus["eval"], args.eval_seqs, args.seq_len, args.calib_batch)
    dense_params = block_params(model)
    dense_ppl = perplexity(model, eval_set)
    print(f"dense held-out perplexity {dense_ppl:.3f} ({dense_params:,} block parameters)", flush=True)

    ready, why = integration_status(model)
    args.use_selector = args.pipeline == "selector" or (args.pipeline == "auto" and ready)
    pipeline_note = ("ChannelSelector (" + why + ")") if args.use_selector else \
        f"this script's block-by-block pipeline (selector not used: {why if not ready else 'forced'})"
    print(f"pipeline: {pipeline_note}", flush=True)

    rows = [{"ratio": None, "method": "dense", "ppl": dense_ppl, "params_kept": 1.0, "time_s": 0.0}]
    for ratio in ([] if args.only_scaling else args.ratios):
        for method in args.methods:
            if method == "tp":
                label, fn = "torch-pruning", (lambda r=ratio: prune_torch_pruning(model, r, calib, args))
            elif method == "lasso" and ratio not in args.lasso_ratios:
                continue
            elif method == "swap_uniform":
                label, fn = "ours:swap (uniform)", (lambda r=ratio: prune_pipeline(model, "swap", r, calib, args))
            elif method == "flap_alam":
                label, fn = "flap (AL-AM)", (lambda r=ratio: prune_flap_alam(model, r, calib, args))
            else:
                label = f"ours:{method}" if method in OURS else method
                via_selector = args.use_selector and (method in OURS or args.baselines_via == "selector")
                if via_selector:
                    fn = lambda m=method, r=ratio: prune_selector(model, m, r, calib, args)  # noqa: E731
                else:
                    fn = lambda m=method, r=ratio: prune_pipeline(model, m, r, calib, args)  # noqa: E731
            row = run_one(label, fn, dense_params, eval_set)
            row["ratio"] = ratio
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}, default=str), flush=True)

    scale_rows = scaling(args) if args.scaling else []
    gqa = gqa_check(args) if args.scaling else None
    notes = [f"LLaMA {args.layers}×d{args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, SwiGLU {args.intermediate}, "
             f"byte vocab {VOCAB}; trained {meta['train_s'] / 60:.1f} min ({meta['tokens']:,} tokens) on the stdlib .py files; "
             f"ppl on {args.eval_seqs}×{args.seq_len} held-out tokens; calibration {args.calib_seqs}×{args.seq_len} tokens.",
             f"Pipeline: {pipeline_note}. No fine-tuning. time = fit + prune wall s ({args.threads} threads, shared CPU); "
             f"peak MB = peak RSS above the start of the method (sampled, after malloc_trim).",
             f"exact: {args.exact_time_limit:g} s per site; worst gap = largest proven relative gap over the sites; "
             f"ours:swap (uniform): {args.swap_time_limit:g} s per site."]
    if not args.only_scaling:
        print_table(rows, dense_ppl, "Structured pruning of a byte-level LLaMA on the Python stdlib: held-out perplexity", notes)
    if scale_rows:
        print_scaling(scale_rows)
    chk = checks(rows, dense_ppl)
    for c in chk:
        print(("PASS " if c["pass"] else "FAIL ") + json.dumps(c), flush=True)
    OUT.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "llm", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "model_key": key, "train": meta, "corpus": {"files": corpus["files"], "hash": corpus["hash"],
                                                    "train_tokens": len(corpus["train"]), "eval_tokens": len(corpus["eval"])},
        "dense_ppl": dense_ppl, "block_params": dense_params, "pipeline": pipeline_note, "rows": rows,
        "checks": chk, "scaling": scale_rows, "gqa": gqa, "total_s": time.perf_counter() - t_start}, indent=2, default=str))
    print(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
