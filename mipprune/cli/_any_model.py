"""``mipprune prune --model FILE --input-shape C,H,W``: prune a model you bring, on your data.

The model file is a pickled ``nn.Module`` (``torch.save(model, FILE)``), TorchScript
(``torch.jit.save`` of a scripted or traced module: converted to a ``torch.export`` program on the
calibration inputs' shape, then lifted) or a ``torch.export`` archive (``.pt2``, lifted back to
prunable modules); what cannot be lifted is refused with what blocks it (see :mod:`mipprune.model_io`).
Calibration inputs come from ``--data`` (a tensor saved with ``torch.save`` or a ``.npy`` array of
shape ``(N, *input_shape)``); without it, standard-normal inputs are used and a warning says that
the reconstruction then fits noise. ``--labels`` (N,) adds top-1 accuracy; otherwise the pruned
model is compared with the dense one (relative output error, top-1 agreement) on a held-out part
of the data. ``--out`` writes the pruned model in the format it came in (TorchScript: traced,
``torch.jit.load``-able; ``FILE.pt2``: a ``torch.export`` archive of the pruned module,
``FILE.onnx``: ONNX); ``--onnx`` also as ONNX.
"""
from __future__ import annotations

import time
from pathlib import Path

from solvers.errors import InvalidInputError

__all__ = ["parse_input_shape", "prune_any_model"]


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` → ``(3, 32, 32)``."""
    try:
        shape = tuple(int(s) for s in str(text).replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise InvalidInputError(f"--input-shape must be positive sizes like 3,32,32 (no batch axis); got {text!r}")
    return shape


def prune_any_model(*, model_path: Path, input_shape: str | None, data_path: Path | None,
                    labels_path: Path | None, selector, out: Path | None, onnx_path: Path | None, seed: int,
                    device, console) -> dict:
    """Load, calibrate, prune, compare and save; returns the JSON-ready record."""
    import torch
    from rich.table import Table

    from mipprune.model_io import export_onnx, load_model, load_tensor, output_format, save_model
    from mipprune.torch_utils import eval_mode
    from mipprune.train import count_flops, count_params

    t_start = time.perf_counter()
    if data_path is not None:
        x = load_tensor(data_path, "--data").float()
        shape = tuple(x.shape[1:])
        if input_shape is not None and parse_input_shape(input_shape) != shape:
            raise InvalidInputError(f"--input-shape must match --data's per-sample shape {shape}; got {input_shape}")
    else:
        if input_shape is None:
            raise InvalidInputError("--input-shape (e.g. 3,32,32) must be given with --model unless --data is")
        shape = parse_input_shape(input_shape)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(256, *shape, generator=g)
        console.print("[bold yellow]warning[/]: no --data given: calibrating on 256 standard-normal inputs of shape "
                      f"{shape}; the reconstruction fits noise, pass real inputs with --data FILE")
    y = None
    if labels_path is not None:
        y = load_tensor(labels_path, "--labels").long().reshape(-1)
        if len(y) != len(x):
            raise InvalidInputError(f"--labels must have one label per --data sample ({len(x)}); got {len(y)}")
    if len(x) < 2:
        raise InvalidInputError(f"--data must hold at least 2 samples; got {len(x)}")
    net, fmt = load_model(model_path, example=x[:2])  # TorchScript is converted on these sample inputs
    net = net.to(device)
    n_eval = max(1, len(x) // 5)  # a held-out fifth for the comparison
    calib_x, eval_x = x[n_eval:], x[:n_eval]
    batches = [calib_x[i:i + 64] for i in range(0, len(calib_x), 64)]
    load_time = time.perf_counter() - t_start

    console.print(f"[bold]Selecting[/] channels of {model_path.name} ({fmt}), input {shape}, on {len(calib_x)} "
                  f"calibration samples")
    t0 = time.perf_counter()
    selector.fit(net, batches)
    fit_time = time.perf_counter() - t0
    pruned = selector.prune(net)

    with eval_mode(net), eval_mode(pruned), torch.no_grad():
        xe = eval_x.to(device)
        dense_out, pruned_out = net(xe), pruned(xe)
    rel = float((pruned_out - dense_out).norm() / dense_out.norm().clamp_min(1e-30))
    agree = (float((pruned_out.argmax(-1) == dense_out.argmax(-1)).float().mean())
             if dense_out.ndim == 2 else None)
    acc = None
    if y is not None and dense_out.ndim == 2:
        ye = y[:n_eval].to(device)
        acc = (float((dense_out.argmax(-1) == ye).float().mean()), float((pruned_out.argmax(-1) == ye).float().mean()))
    n_params = (count_params(net), count_params(pruned))
    n_flops = (count_flops(net, shape), count_flops(pruned, shape))

    console.print(selector.report())
    table = Table(title=f"Summary ({n_eval} held-out samples)")
    for col in ("quantity", "before", "after", "after / before"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    table.add_row("parameters", f"{n_params[0]:,}", f"{n_params[1]:,}", f"{n_params[1] / n_params[0]:.3f}")
    table.add_row("FLOPs (MACs / sample)", f"{n_flops[0]:,}", f"{n_flops[1]:,}", f"{n_flops[1] / n_flops[0]:.3f}")
    table.add_row("relative output error", "0", f"{rel:.4f}", "")
    if agree is not None:
        table.add_row("top-1 agreement with dense", "1", f"{agree:.4f}", "")
    if acc is not None:
        table.add_row("accuracy", f"{acc[0]:.4f}", f"{acc[1]:.4f}", "")
    table.caption = f"time: loading {load_time:.2f} s, selection {fit_time:.2f} s"
    console.print(table)
    saved = {}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out_fmt = output_format(out, fmt)
        if out_fmt == "onnx":
            export_onnx(pruned.cpu(), out, eval_x[:1].cpu())
        else:
            save_model(pruned.cpu(), out, out_fmt, eval_x[:1].cpu())
        saved["model"], saved["model_format"] = str(out), out_fmt
        console.print(f"pruned model saved to {out} ({out_fmt})")
    if onnx_path is not None:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(pruned.cpu(), onnx_path, eval_x[:1].cpu())
        saved["onnx"] = str(onnx_path)
        console.print(f"ONNX written to {onnx_path}")
    return {"model": str(model_path), "format": fmt, "input_shape": list(shape), "calibration_samples": len(calib_x),
            "eval_samples": n_eval, "random_inputs": data_path is None, "layers": selector.report_rows(),
            "params": {"before": n_params[0], "after": n_params[1]}, "flops": {"before": n_flops[0], "after": n_flops[1]},
            "relative_output_error": rel, "top1_agreement": agree,
            "accuracy": None if acc is None else {"dense": acc[0], "pruned": acc[1]},
            "budget": selector.budget_, "saved": saved, "time": {"load": load_time, "select": fit_time}}
