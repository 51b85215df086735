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

__all__ = ["prune_hf_folder", "prune_text_module"]

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


def _check_text(text_path: Path | None, seq_len: int, what: str) -> None:
    if text_path is None:
        raise InvalidInputError(f"--text FILE (calibration text) must be given with --model {what}; got none")
    if not text_path.is_file():
        raise InvalidInputError(f"--text must be a readable text file; got {str(text_path)!r}")
    if seq_len < 2:
        raise InvalidInputError(f"--seq-len must be >= 2 tokens; got {seq_len}")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def prune_hf_folder(*, model_dir: Path, text_path: Path | None, seq_len: int, selector, out: Path | None,
                    device, console) -> dict:
    """Load, tokenize, calibrate, prune, compare perplexities and save; returns the JSON-ready record."""
    from mipprune.pruning.transformer_hf import load_pruned

    if not (model_dir / "config.json").is_file():
        raise InvalidInputError(f"--model must be a Hugging Face model folder with config.json; got {str(model_dir)!r}")
    _check_text(text_path, seq_len, "FOLDER")
    if not _has_tokenizer(model_dir):
        raise InvalidInputError(f"--model folder must hold a tokenizer ({', '.join(_TOKENIZER_FILES)}) to tokenize "
                                f"--text; got none in {str(model_dir)!r}")
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pruned(model_dir).to(device)
    load_time = time.perf_counter() - t0
    ids = tokenizer(text_path.read_text(errors="replace"), return_tensors="pt")["input_ids"][0]
    record = _prune_on_ids(model, ids, seq_len=seq_len, selector=selector, device=device, console=console,
                           load_time=load_time)
    pruned = record.pop("_pruned")
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
    return {"model": str(model_dir), "text": str(text_path), **record, "saved": saved}


def prune_text_module(*, model_path: Path, text_path: Path | None, tokenizer_dir: Path | None, seq_len: int,
                      selector, out: Path | None, device, console) -> dict:
    """``--model FILE --text FILE``: a pickled Hugging Face causal LM (``torch.save(model, FILE)``), the text
    tokenized by ``--tokenizer DIR`` or, without one, read as UTF-8 bytes (token ids 0–255, for byte-level
    models); the pruned module is written back pickled (``torch.save``) to ``--out``."""
    import torch
    from torch import nn

    from rich.markup import escape

    from mipprune.model_io import load_model
    from mipprune.pruning.transformer_sites import find_adapter

    _check_text(text_path, seq_len, "FILE")
    t0 = time.perf_counter()
    model, fmt = load_model(model_path)
    if fmt != "pickle":
        raise InvalidInputError(f"--text needs --model to be a pickled Hugging Face causal LM (torch.save(model, FILE)) "
                                f"or a model folder; got a {fmt} file {str(model_path)!r}")
    if find_adapter(model) is None or not hasattr(model, "get_input_embeddings"):
        raise InvalidInputError(f"--text needs a transformer language model that takes token ids (a Hugging Face "
                                f"causal LM: LLaMA, Qwen2, Mistral, OPT, GPT-2); got {type(model).__name__} from "
                                f"{str(model_path)!r}")
    vocab = model.get_input_embeddings().num_embeddings
    text = text_path.read_text(errors="replace")
    if tokenizer_dir is not None:
        if not _has_tokenizer(tokenizer_dir):
            raise InvalidInputError(f"--tokenizer must be a folder with a tokenizer ({', '.join(_TOKENIZER_FILES)}); "
                                    f"got {str(tokenizer_dir)!r}")
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, return_tensors="pt")["input_ids"][0]
        tokenized = f"tokenizer {tokenizer_dir}"
    else:
        if vocab < 256:
            raise InvalidInputError(f"--text without --tokenizer is read as UTF-8 bytes (ids 0-255), but the model's "
                                    f"vocabulary has {vocab} tokens; pass --tokenizer DIR")
        console.print("[bold yellow]warning[/]: " + escape("no --tokenizer given: the calibration text is read as "
                                                            "UTF-8 bytes (token ids 0-255); this is only right for "
                                                            "byte-level models"))
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        tokenized = "utf-8 bytes"
    if int(ids.max()) >= vocab:
        raise InvalidInputError(f"the tokenized --text has token id {int(ids.max())}, but the model's vocabulary has "
                                f"{vocab} tokens")
    assert isinstance(model, nn.Module)
    model = model.to(device)
    record = _prune_on_ids(model, ids, seq_len=seq_len, selector=selector, device=device, console=console,
                           load_time=time.perf_counter() - t0)
    pruned = record.pop("_pruned")
    saved = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned.cpu(), out)
        saved = str(out)
        console.print(f"pruned model saved to {out} (torch.save of the module; load with torch.load(FILE, "
                      f"weights_only=False))")
    return {"model": str(model_path), "text": str(text_path), "tokenized": tokenized, **record, "saved": saved}


def _prune_on_ids(model, ids, *, seq_len: int, selector, device, console, load_time: float) -> dict:
    """Cut ``ids`` into sequences, calibrate on the first nine tenths, compare held-out perplexities."""
    from rich.table import Table

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
    return {"seq_len": seq_len, "calibration_sequences": len(calib), "eval_sequences": n_eval,
            "layers": selector.report_rows(), "block_params": {"before": dense_p, "after": pruned_p},
            "perplexity": {"dense": ppl[0], "pruned": ppl[1]}, "budget": selector.budget_, "memory": selector.memory_,
            "time": {"load": load_time, "select": fit_time}, "_pruned": pruned}
