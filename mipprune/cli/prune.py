"""``mipprune prune``: train (or load) a digits classifier, select channels, prune, report.

Targets: ``--sparsity`` (fraction of channels removed per layer, default 0.5), or a network-wide
``--flops`` / ``--params`` fraction of the dense FLOPs / parameters to keep (widths allocated by
:func:`solvers.allocate_budget`). ``--finetune N`` adds N epochs of knowledge-distillation
fine-tuning of the pruned model from the dense one (:func:`mipprune.train.finetune`).

Without ``--model`` the seeded default CNN (:func:`mipprune.models.digits_cnn`) is trained on the
embedded digits data in a few seconds. ``--model FILE`` loads a *whole pickled module* written with
``torch.save(model, FILE)``; it is loaded with ``torch.load(FILE, weights_only=False)``, which runs
pickled code: only load files you trust. ``--model FILE --input-shape C,H,W`` (or ``--data``) also
takes TorchScript (converted to ``torch.export`` on sample inputs, then lifted; written back as
TorchScript) and ``torch.export`` archives (:mod:`mipprune.cli._any_model`). ``--model FOLDER --text
FILE`` prunes the heads and MLP neurons of a Hugging Face causal LM folder on that text and writes a
folder (:mod:`mipprune.cli._hf_folder`);
``--model FILE --text FILE [--tokenizer DIR]`` does the same for a pickled causal LM and writes it pickled.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from mipprune.cli._app import app
from solvers.errors import InvalidInputError

_INPUT_SHAPES = ((1, 8, 8), (64,))  # the digits as images (CNNs) or flat vectors (MLPs)


def _load_model(path: Path):
    """The pickled ``nn.Module`` at ``path`` (see :func:`mipprune.model_io.load_model`)."""
    from mipprune.model_io import load_model

    return load_model(path)[0]


def _infer_input_shape(model, x_images) -> tuple[int, ...]:
    """The first of (1, 8, 8) and (64,) on which ``model`` returns (N, 10) logits."""
    import torch

    from mipprune.torch_utils import eval_mode

    errors = []
    for shape in _INPUT_SHAPES:
        x = x_images[:2].reshape(2, *shape)
        try:
            with eval_mode(model), torch.no_grad():
                out = model(x)
        except Exception as exc:  # the user's model rejects this layout: try the next one
            errors.append(f"{shape}: {type(exc).__name__}: {exc}")
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 10):
            return shape
        errors.append(f"{shape}: output shape {tuple(getattr(out, 'shape', ()))}")
    raise InvalidInputError("--model must take digits inputs of shape (N, 1, 8, 8) or (N, 64) and return "
                            f"(N, 10) logits; got {'; '.join(errors)}")


def parse_method_options(items: list[str] | None) -> dict:
    """``--option NAME=VALUE`` items as a dict: ``true``/``false`` become booleans, integers and floats numbers,
    anything else stays a string (the method checks the names and the values)."""
    options: dict = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise InvalidInputError(f"--option must be NAME=VALUE (e.g. --option workers=2); got {item!r}")
        if raw.lower() in ("true", "false"):
            value: object = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        options[name] = value
    return options


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@app.command("prune")
def prune_command(
    model: Optional[Path] = typer.Option(
        None, "--model", help="A whole module saved with torch.save(model, FILE) (loaded with "
        "weights_only=False: trusted files only), a torch.export archive (.pt2), or TorchScript (torch.jit.save of a "
        "scripted or traced module; needs --input-shape or --data: it is converted with torch's TorchScript-to-export "
        "converter on sample inputs), evaluated on the digits (or on --data / --input-shape); or a Hugging Face "
        "causal LM folder (with --text). Default: train the digits CNN."),
    method: str = typer.Option("lasso", "--method", help="Selection method: lasso, exact, greedy, backward, "
                               "swap, magnitude, random (solvers), l1, bn_scale, hrank, mean_activation, similarity "
                               "(criteria + refit), tecu (block-coordinate descent)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of channels REMOVED per layer, "
                                             "in (0, 1). Default 0.5 unless --flops or --params is given."),
    flops: Optional[float] = typer.Option(None, "--flops", help="Fraction of the dense FLOPs (MACs) to KEEP, in "
                                          "(0, 1]: per-layer widths allocated network-wide."),
    params: Optional[float] = typer.Option(None, "--params", help="Fraction of the dense parameters to KEEP, in "
                                           "(0, 1]: per-layer widths allocated network-wide."),
    budget_backend: str = typer.Option("highs", "--budget-backend", help="Width allocation solver: highs (MILP) "
                                       "or cpsat (OR-Tools CP-SAT)."),
    budget_time_limit: Optional[float] = typer.Option(None, "--budget-time-limit",
                                                      help="Seconds for the width allocation."),
    finetune_epochs: int = typer.Option(0, "--finetune", help="Epochs of knowledge-distillation fine-tuning of "
                                        "the pruned model on the training split (0: none)."),
    finetune_lr: float = typer.Option(1e-3, "--finetune-lr", help="Adam learning rate of --finetune."),
    max_iter: int = typer.Option(3, "--max-iter", help="TECU outer iterations (--method tecu)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (training and calibration)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Save the pruned model here: in the format it came in "
                                       "(torch.save; TorchScript as traced TorchScript), FILE.pt2 a torch.export "
                                       "archive, FILE.onnx ONNX (with --model and --input-shape/--data)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    seed: int = typer.Option(0, "--seed", help="Seed of data split, training, sampling and selection."),
    positions: int = typer.Option(10, "--positions", help="Spatial positions sampled per image per conv."),
    epochs: int = typer.Option(5, "--epochs", help="Training epochs of the default model (ignored with --model)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Solver backend of the method (default: its own)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds per layer selection."),
    gap: Optional[float] = typer.Option(None, "--gap", help="--method exact: relative optimality gap at which a "
                                        "layer stops as optimal (default 1e-4)."),
    sequential: bool = typer.Option(True, "--sequential/--one-shot",
                                    help="He et al.'s sequential calibration (default) or one capture."),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="Per-sample input shape of --model, e.g. 3,32,32: prune it on --data (or random "
        "inputs) instead of the digits."),
    data_path: Optional[Path] = typer.Option(None, "--data", help="Calibration inputs of --model: a tensor saved with "
                                             "torch.save or a .npy array (N, *input shape)."),
    labels_path: Optional[Path] = typer.Option(None, "--labels", help="Labels (N,) of --data, for accuracy."),
    onnx_path: Optional[Path] = typer.Option(None, "--onnx", help="Also write the pruned model as one ONNX file."),
    groups: str = typer.Option("auto", "--groups", help="Channel analysis: auto, pairs, or graph (groups through "
                               "residual adds, concats, gates, depthwise/grouped convs)."),
    max_memory: float = typer.Option(4.0, "--max-memory", help="GiB of statistics one channel group may take; a "
                                     "larger group stays whole."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text of --model FOLDER (a Hugging Face "
                                        "causal LM folder), tokenized with the folder's tokenizer."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per calibration sequence of --text."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for --text with --model FILE "
                                             "(a pickled causal LM); without it the text is read as UTF-8 bytes."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="A keyword argument of the selection method, "
                                               "NAME=VALUE, repeatable (e.g. --method exact --option workers=2 "
                                               "--option restart=false); a name the method does not take is refused."),
) -> None:
    """Prune a digits classifier: select the channels to keep per layer, refit, and report accuracy,
    parameters and FLOPs before and after (with and without least-squares reconstruction)."""
    import torch
    from rich.table import Table

    from mipprune.cli._console import make_console
    from mipprune.data import load_digits_data, make_loader
    from mipprune.pruning.selector import ChannelSelector
    from mipprune.train import count_flops, count_params, evaluate, finetune, train_digits_cnn
    from mipprune.torch_utils import resolve_device

    console = make_console()
    t_start = time.perf_counter()
    # Validate everything cheap before any training.
    dev = resolve_device(device)
    if epochs < 0:
        raise InvalidInputError(f"--epochs must be >= 0; got {epochs}")
    if finetune_epochs < 0:
        raise InvalidInputError(f"--finetune must be >= 0 epochs; got {finetune_epochs}")
    if sparsity is None and flops is None and params is None:
        sparsity = 0.5
    if not max_memory > 0:
        raise InvalidInputError(f"--max-memory must be > 0 GiB; got {max_memory}")
    if model is None and (input_shape is not None or data_path is not None or labels_path is not None):
        raise InvalidInputError("--input-shape, --data and --labels must come with --model FILE; got no --model")
    selector = ChannelSelector(method, sparsity=sparsity, flops=flops, params=params, backend=backend,
                               budget_backend=budget_backend, budget_time_limit=budget_time_limit,
                               positions=positions, seed=seed, time_limit=time_limit, sequential=sequential,
                               max_iter=max_iter, gap=gap, device=dev, progress=True, groups=groups,
                               max_memory=int(max_memory * 2**30), method_options=parse_method_options(option))
    target = (f"sparsity={sparsity}" if sparsity is not None else
              f"flops={flops}" if flops is not None else f"params={params}")

    if model is not None and model.is_dir():  # a Hugging Face model folder: heads and neurons, on --text
        from mipprune.cli._hf_folder import prune_hf_folder

        record = prune_hf_folder(model_dir=model, text_path=text, seq_len=seq_len, selector=selector, out=out,
                                 device=dev, console=console)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2, default=str))
            console.print(f"results written to {json_path}")
        return
    if text is not None or tokenizer is not None:
        if model is None or input_shape is not None or data_path is not None:
            raise InvalidInputError("--text/--tokenizer must come with --model FOLDER (a Hugging Face model folder) or "
                                    "--model FILE (a pickled causal LM), without --input-shape/--data")
        from mipprune.cli._hf_folder import prune_text_module

        record = prune_text_module(model_path=model, text_path=text, tokenizer_dir=tokenizer, seq_len=seq_len,
                                   selector=selector, out=out, device=dev, console=console)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2, default=str))
            console.print(f"results written to {json_path}")
        return
    if model is not None and (input_shape is not None or data_path is not None):
        from mipprune.cli._any_model import prune_any_model

        record = prune_any_model(model_path=model, input_shape=input_shape, data_path=data_path,
                                 labels_path=labels_path, selector=selector, out=out, onnx_path=onnx_path, seed=seed,
                                 device=dev, console=console)
        if json_path is not None:
            record["config"] = {"method": method, "sparsity": sparsity, "flops_target": flops, "params_target": params,
                                "groups": groups, "seed": seed, "positions": positions, "sequential": sequential,
                                "device": str(dev), "max_memory_gib": max_memory,
                                "method_options": selector.method_options}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2, default=str))
            console.print(f"results written to {json_path}")
        return

    t0 = time.perf_counter()
    if model is None:
        console.print(f"[bold]Training[/] the default digits CNN ({epochs} epochs, seed {seed}) on {dev}")
        net, data = train_digits_cnn(seed=seed, epochs=epochs, device=dev, progress=True)
        input_shape = (1, 8, 8)
        source = "digits_cnn (trained)"
    else:
        net = _load_model(model).to(dev)
        data = load_digits_data(seed=seed, device=dev)
        input_shape = _infer_input_shape(net, data.x_train)
        source = str(model)
    train_time = time.perf_counter() - t0
    x_train = data.x_train.reshape(len(data.x_train), *input_shape)
    x_test = data.x_test.reshape(len(data.x_test), *input_shape)
    test = (x_test, data.y_test)
    calib = make_loader(x_train, batch_size=256)

    console.print(f"[bold]Selecting[/] channels: method={method}, {target}, "
                  f"{'sequential' if sequential else 'one-shot'} calibration on {len(x_train)} images")
    t0 = time.perf_counter()
    selector.fit(net, calib)
    fit_time = time.perf_counter() - t0
    pruned = selector.prune(net)
    masked = selector.prune(net, reconstruct=False)

    acc_dense, acc_masked, acc_pruned = (evaluate(m, test) for m in (net, masked, pruned))
    n_params = (count_params(net), count_params(pruned))
    n_flops = (count_flops(net, input_shape), count_flops(pruned, input_shape))
    acc_tuned, tune_time = None, 0.0
    if finetune_epochs > 0:
        console.print(f"[bold]Fine-tuning[/] the pruned model: {finetune_epochs} epochs of knowledge distillation "
                      "from the dense model on the training split")
        t0 = time.perf_counter()
        train = make_loader(x_train, data.y_train, batch_size=64, shuffle=True, seed=seed)
        pruned = finetune(pruned, net, train, epochs=finetune_epochs, lr=finetune_lr, device=dev, seed=seed,
                          progress=True)
        tune_time = time.perf_counter() - t0
        acc_tuned = evaluate(pruned, test)
    total_time = time.perf_counter() - t_start

    console.print(selector.report())
    summary = Table(title="Summary (digits test set)")
    summary.add_column("quantity")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("after / before", justify="right")
    summary.add_row("accuracy (mask only, old weights)", f"{acc_dense:.4f}", f"{acc_masked:.4f}", "")
    summary.add_row("accuracy (reconstructed)", f"{acc_dense:.4f}", f"{acc_pruned:.4f}", "")
    if acc_tuned is not None:
        summary.add_row(f"accuracy (reconstructed + KD fine-tuning, {finetune_epochs} ep.)", f"{acc_dense:.4f}",
                        f"{acc_tuned:.4f}", "")
    summary.add_row("parameters", _fmt_int(n_params[0]), _fmt_int(n_params[1]), f"{n_params[1] / n_params[0]:.3f}")
    summary.add_row("FLOPs (MACs / sample)", _fmt_int(n_flops[0]), _fmt_int(n_flops[1]),
                    f"{n_flops[1] / n_flops[0]:.3f}")
    summary.caption = (f"time: {'training' if model is None else 'loading'} {train_time:.2f} s, "
                       f"selection {fit_time:.2f} s" + (f", fine-tuning {tune_time:.2f} s" if acc_tuned is not None
                                                        else "") + f", total {total_time:.2f} s")
    console.print(summary)
    budget = selector.budget_
    if budget is not None:
        alloc = budget["allocation"]
        lo, hi = budget["window"]
        alloc_gap = "-" if alloc.get("gap") is None else f"{100 * alloc['gap']:.2f}%"
        console.print(f"[bold]Budget[/]: {budget['metric']} kept {budget['achieved_ratio']:.4f} of dense "
                      f"(target window [{lo:.4f}, {hi:.4f}]: {'hit' if budget['in_window'] else 'MISSED'}); "
                      f"allocation {alloc.get('status')}, objective {alloc.get('objective')}, "
                      f"bound {alloc.get('bound')}, gap {alloc_gap}; widths {budget['widths']}")
    if selector.tecu_history_ is not None:
        steps = ", ".join(f"{h['iteration']}: {h['objective']:.3e}" for h in selector.tecu_history_)
        console.print(f"[bold]TECU[/] end-to-end objective per iteration: {steps}")

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned.cpu(), out)
        console.print(f"pruned model saved to {out} (load with torch.load(path, weights_only=False))")
    if onnx_path is not None:
        from mipprune.model_io import export_onnx

        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(pruned.cpu(), onnx_path, x_test[:1].cpu())
        console.print(f"ONNX written to {onnx_path}")
    if json_path is not None:
        record = {
            "config": {"model": source, "method": method, "sparsity": sparsity, "flops_target": flops,
                       "params_target": params, "budget_backend": budget_backend,
                       "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr, "max_iter": max_iter,
                       "device": str(dev),
                       "seed": seed, "positions": positions, "epochs": epochs if model is None else None,
                       "backend": backend, "time_limit": time_limit, "gap": gap, "sequential": sequential,
                       "method_options": selector.method_options, "input_shape": list(input_shape),
                       "calibration_samples": len(x_train),
                       "test_samples": len(x_test)},
            "layers": selector.report_rows(),
            "accuracy": {"dense": acc_dense, "pruned_no_reconstruction": acc_masked,
                         "pruned_reconstructed": acc_pruned, "pruned_finetuned": acc_tuned},
            "params": {"before": n_params[0], "after": n_params[1], "ratio": n_params[1] / n_params[0]},
            "flops": {"before": n_flops[0], "after": n_flops[1], "ratio": n_flops[1] / n_flops[0]},
            "budget": selector.budget_,
            "tecu_history": selector.tecu_history_,
            "time": {"train": train_time, "select": fit_time, "finetune": tune_time, "total": total_time},
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2))
        console.print(f"results written to {json_path}")

