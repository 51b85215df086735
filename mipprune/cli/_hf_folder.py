"""``mipprune prune --model FOLDER --text FILE``: prune a Hugging Face causal LM folder on your text.

The folder is what ``save_pretrained`` writes (``config.json`` + safetensors, and a tokenizer); a folder
pruned by mipprune before is read with :func:`mipprune.load_pruned`. ``--text`` is tokenized with the
folder's own tokenizer and cut into sequences of ``--seq-len`` tokens; the last tenth of them (at
least one) is held out to compare the perplexity of the dense and the pruned model, the rest calibrates.
``--out`` writes a folder (``save_pretrained``, with the tokenizer) that ``from_pretrained`` loads when
every layer keeps the same widths, and :func:`mipprune.load_pruned` always.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from solvers.errors import InvalidInputError

__all__ = ["prune_hf_folder"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _perplexity(model, seqs) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            x = seqs[i:i + 8]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                           reduction="sum"))
            n += x[:, 1:].numel()
    return math.exp(nll / max(n, 1))


def prune_hf_folder(*, model_dir: Path, text_path: Path | None, seq_len: int, selector, out: Path | None,
                    device, console) -> dict:
    """Load, tokenize, calibrate, prune, compare perplexities and save; returns the JSON-ready record."""
    from rich.table import Table

    from mipprune.pruning.transformer_hf import load_pruned

    if not (model_dir / "config.json").is_file():
        raise InvalidInputError(f"--model must be a Hugging Face model folder with config.json; got {str(model_dir)!r}")
    if text_path is None:
        raise InvalidInputError("--text FILE (calibration text) must be given with --model FOLDER; got none")
    if not text_path.is_file():
        raise InvalidInputError(f"--text must be a readable text file; got {str(text_path)!r}")
    if seq_len < 2:
        raise InvalidInputError(f"--seq-len must be >= 2 tokens; got {seq_len}")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise InvalidInputError(f"--model folder must hold a tokenizer ({', '.join(_TOKENIZER_FILES)}) to tokenize "
                                f"--text; got none in {str(model_dir)!r}")
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pruned(model_dir).to(device)
    load_time = time.perf_counter() - t0
    ids = tokenizer(text_path.read_text(errors="replace"), return_tensors="pt")["input_ids"][0]
    n_seq = len(ids) // seq_len
    if n_seq < 2:
        raise InvalidInputError(f"--text must give at least 2 sequences of --seq-len {seq_len} tokens (one to calibrate, "
                                f"one held out); got {len(ids)} tokens")
    seqs = ids[: n_seq * seq_len].reshape(n_seq, seq_len)
    n_eval = max(1, n_seq // 10)
    calib, held = seqs[:-n_eval], seqs[-n_eval:].to(device)
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    console.print(f"[bold]Selecting[/] heads and neurons: method={selector.method}, {selector._target_repr()}, "
                  f"{len(calib)} sequences of {seq_len} tokens, block by block")
    t0 = time.perf_counter()
    selector.fit(model, batches)
    fit_time = time.perf_counter() - t0
    pruned = selector.prune(model)
    ppl = (_perplexity(model.eval(), held), _perplexity(pruned.eval(), held))
    info = selector.transformer_
    console.print(selector.report())
    table = Table(title=f"Summary ({n_eval} held-out sequences of {seq_len} tokens)")
    for col in ("quantity", "before", "after", "after / before"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    dense_p, pruned_p = info["dense_block_params"], info["pruned_block_params"]
    table.add_row("transformer block parameters", f"{dense_p:,}", f"{pruned_p:,}", f"{pruned_p / dense_p:.3f}")
    table.add_row("perplexity", f"{ppl[0]:.3f}", f"{ppl[1]:.3f}", f"{ppl[1] / ppl[0]:.3f}")
    table.caption = f"time: loading {load_time:.2f} s, selection {fit_time:.2f} s"
    console.print(table)
    saved = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        pruned.cpu().save_pretrained(out)
        tokenizer.save_pretrained(out)
        saved = str(out)
        sizes = getattr(pruned.config, "mipprune_layer_sizes", {}) or {}
        how = ("from_pretrained(folder) or mipprune.load_pruned(folder)" if sizes.get("from_pretrained")
               else "mipprune.load_pruned(folder) (per-layer widths)")
        console.print(f"pruned model saved to {out}: load with {how}")
    return {"model": str(model_dir), "text": str(text_path), "seq_len": seq_len, "calibration_sequences": len(calib),
            "eval_sequences": n_eval, "layers": selector.report_rows(), "block_params": {"before": dense_p, "after": pruned_p},
            "perplexity": {"dense": ppl[0], "pruned": ppl[1]}, "budget": selector.budget_, "memory": selector.memory_,
            "saved": saved, "time": {"load": load_time, "select": fit_time}}
