"""Reading and writing user models: a pickled ``nn.Module``, TorchScript, or a ``torch.export``
archive, and ONNX on request.

Pruning needs modules to slice (``nn.Conv2d`` / ``nn.Linear`` / BatchNorm) under a forward that
``torch.fx`` traces. A pickled module (``torch.save(model, FILE)``) is pruned directly. A
``torch.export`` archive (``.pt2``) is *lifted* back to such a module
(:func:`lift_exported_program`): its ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` calls
become modules at their parameters' original names, the other ATen ops the torch functions they
stand for, the exported input guards are dropped; an op with no such equivalent, or a ``view`` to a
size the export hard-coded (e.g. a channel shuffle's), is refused by name. TorchScript files are
loaded and refused with what blocks them: a ScriptModule's layers run compiled IR that fx cannot
trace. A pruned model is written by :func:`save_model` as a pickled module, TorchScript (traced) or
a ``torch.export`` archive (``torch.export.export`` of the pruned module, batch dimension free when
the model allows), and by :func:`export_onnx` as one ONNX file.
"""
from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["FORMATS", "detect_format", "load_model", "save_model", "export_onnx", "load_tensor", "output_format",
           "lift_exported_program"]

FORMATS = ("pickle", "torchscript", "export")


def detect_format(path: Path) -> str:
    """``"torchscript"``, ``"export"`` or ``"pickle"`` from the archive's member names."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"--model must be an existing file; got {str(path)!r}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
            return "export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
    return "pickle"


def load_model(path: Path) -> tuple[nn.Module, str]:
    """``(module, format)``. Pickled modules are loaded with ``weights_only=False``, which runs the
    file's pickled code: only load files you trust. A ``torch.export`` archive comes back lifted to
    a prunable module (:func:`lift_exported_program`).

    Raises :class:`UnsupportedLayerError` for TorchScript (no layers fx can trace; save the Python
    module with ``torch.save(model, FILE)``) and for exported graphs that cannot be lifted (the op
    that blocks), :class:`InvalidInputError` for anything that is not a module."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice that TorchScript is deprecated
            scripted = torch.jit.load(str(path), map_location="cpu")  # a clean error if it is not readable
        raise UnsupportedLayerError(
            f"--model must be a pickled nn.Module to be pruned; got TorchScript ({path.name}): torch.jit.load "
            f"gives a {type(scripted).__name__} whose {_script_layers(scripted)} run compiled TorchScript IR, "
            "which torch.fx cannot trace (no channel graph) and whose weights cannot be resliced under a "
            f"consistent forward. {_PASS_INSTEAD}")
    if fmt == "export":
        program = torch.export.load(str(path))
        return lift_exported_program(program, path.name), fmt
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidInputError(f"--model must be a module saved with torch.save(model, FILE); got "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"--model must hold a torch.nn.Module saved with torch.save(model, FILE); "
                                f"got {type(model).__name__} (a state_dict needs its model class)")
    return model, fmt


_PASS_INSTEAD = ("Pass the Python module instead: torch.save(model, FILE) (its class importable when loading), "
                 "or prune it in Python with mipprune.ChannelSelector; --out FILE.pt2 then writes the pruned model as a "
                 "torch.export archive, --onnx as ONNX")


def _aten_table() -> dict:
    """ATen ops of a ``torch.export`` graph → the torch functions fx's channel analysis reads (same
    positional signatures)."""
    import torch.nn.functional as F

    aten = torch.ops.aten
    table = {
        aten.relu.default: torch.relu, aten.relu_.default: torch.relu, aten.add.Tensor: torch.add,
        aten.add_.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
        aten.mul_.Tensor: torch.mul, aten.div.Tensor: torch.div, aten.cat.default: torch.cat,
        aten.flatten.using_ints: torch.flatten, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
        aten.avg_pool2d.default: F.avg_pool2d, aten.max_pool2d.default: F.max_pool2d, aten.mean.dim: torch.mean,
        aten.hardtanh.default: F.hardtanh, aten.hardtanh_.default: F.hardtanh, aten.sigmoid.default: torch.sigmoid,
        aten.hardsigmoid.default: F.hardsigmoid, aten.hardswish.default: F.hardswish,
        aten.hardswish_.default: F.hardswish, aten.silu.default: F.silu, aten.silu_.default: F.silu,
        aten.gelu.default: F.gelu, aten.tanh.default: torch.tanh, aten.dropout.default: F.dropout,
        aten.chunk.default: torch.chunk, aten.split.Tensor: torch.split, aten.transpose.int: torch.transpose,
        aten.clone.default: torch.clone, aten.dropout_.default: F.dropout, aten.sigmoid_.default: torch.sigmoid,
        aten.tanh_.default: torch.tanh, aten.leaky_relu.default: F.leaky_relu, aten.leaky_relu_.default: F.leaky_relu,
        aten.elu.default: F.elu, aten.relu6.default: F.relu6, aten.mish.default: F.mish,
        aten.softplus.default: F.softplus,
    }
    return table


def _bound(node) -> dict:
    """The arguments of an ATen call by their schema names (positional, keyword or default)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def lift_exported_program(program, name: str = "the archive") -> nn.Module:
    """An ``nn.Module`` that computes what ``program`` (a ``torch.export`` ExportedProgram) computes, with
    its ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` calls as ``nn.Conv2d`` / ``nn.Linear`` /
    ``nn.BatchNorm`` modules at their parameters' original names and the other ATen ops as the torch
    functions the channel analysis reads, so that it can be pruned like the Python module (an fx
    ``GraphModule``, picklable). The exported input-shape guards are dropped (the ops are batch-size
    agnostic; a fixed-shape ``view`` is refused).

    Raises :class:`UnsupportedLayerError` naming the op that blocks it."""
    def refuse(why: str):
        return UnsupportedLayerError(
            f"--model must be a pickled nn.Module or a torch.export archive of supported ops; got {name}, whose "
            f"ExportedProgram ({_aten_layers(program)}) cannot be turned back into prunable modules: {why}. "
            f"{_PASS_INSTEAD}")

    gm = program.module()
    root = nn.Module()  # the parameters and buffers at their original names, nothing else of gm
    for target in {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
        path, _, leaf = target.rpartition(".")
        holder = root
        for part in path.split(".") if path else []:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        value = getattr(gm.get_submodule(path), leaf)
        if isinstance(value, nn.Parameter):
            holder.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
        else:
            holder.register_buffer(leaf, value.detach().clone())
    graph = torch.fx.Graph()  # a plain copy: no pytree codegen, no input guards
    graph.output(graph.graph_copy(gm.graph, {}))
    table = _aten_table()
    aten = torch.ops.aten
    params = {n: n.target for n in graph.nodes if n.op == "get_attr"}
    used: set[str] = set()

    def owner(weight_node) -> str:
        """The module path of a layer's parameter (each layer called once)."""
        if weight_node not in params:
            raise refuse(f"a layer whose weight is computed, not a parameter ({weight_node})")
        path = params[weight_node].rpartition(".")[0]
        if path in used:
            raise refuse(f"the layer {path!r} is called more than once")
        used.add(path)
        return path

    def tensor(n):
        """The parameter / buffer a ``get_attr`` node reads (``None`` for ``None``)."""
        if n is None:
            return None
        path, _, leaf = params[n].rpartition(".")
        return getattr(root.get_submodule(path), leaf)

    def install(path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, module)

    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        t, a = node.target, list(node.args)
        if t is aten.conv2d.default:
            v = _bound(node)
            x, w, b, groups = v["input"], v["weight"], v["bias"], v["groups"]
            path = owner(w)
            weight = tensor(w)
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=v["stride"],
                              padding=v["padding"], dilation=v["dilation"], groups=groups, bias=b is not None)
        elif t is aten.linear.default:
            v = _bound(node)
            x, w, b = v["input"], v["weight"], v["bias"]
            path = owner(w)
            weight = tensor(w)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        elif t is aten.batch_norm.default:
            v = _bound(node)
            x, w, b, rm, rv = v["input"], v["weight"], v["bias"], v["running_mean"], v["running_var"]
            if rm not in params or v["training"]:
                raise refuse(f"a batch_norm without running statistics or in training mode ({node.name})")
            path = owner(rm)
            dims = node.meta["val"].dim() if "val" in node.meta else 4
            layer = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(tensor(rm).numel(), eps=v["eps"],
                                                                      momentum=v["momentum"], affine=w is not None)
            layer.running_mean, layer.running_var = tensor(rm), tensor(rv)
        elif t in (aten.view.default, aten.reshape.default):
            src = a[0].meta.get("val") if isinstance(a[0], torch.fx.Node) else None
            shape = list(a[1])
            batch = len(shape) == 2 and (isinstance(shape[0], torch.fx.Node) or shape[0] == -1 or (
                src is not None and shape[0] == src.shape[0]))
            if src is None or src.dim() < 2 or not batch or shape[1] != math.prod(src.shape[1:]):
                raise refuse(f"{t} to the shape ({', '.join(map(str, shape))}) ({node.name}): the exported graph "
                             "hard-codes channel sizes that pruning changes (only a flatten to (batch, features) is "
                             "lifted)")
            node.target, node.args = torch.flatten, (a[0], 1)
            continue
        elif t is aten.contiguous.default:
            node.op, node.target, node.args = "call_method", "contiguous", (a[0],)
            continue
        elif t is aten.sym_size.int:  # x.size(d) of a dynamic dimension
            node.op, node.target = "call_method", "size"
            continue
        elif t in table:
            node.target = table[t]
            continue
        elif t.__module__ == "_operator":
            continue
        else:
            raise refuse(f"the op {t} ({node.name}) has no prunable equivalent here")
        layer.weight, layer.bias = tensor(w), tensor(b)  # the exported parameters themselves
        install(path, layer)
        node.op, node.target, node.args, node.kwargs = "call_module", path, (x,), {}
    out = next(n for n in graph.nodes if n.op == "output")
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)  # the single output as the module returned it
    lifted = torch.fx.GraphModule(root, graph, "LiftedExport")
    lifted.graph.eliminate_dead_code()
    lifted.recompile()
    return lifted.eval()


def _script_layers(scripted) -> str:
    """``"3 Conv2d and 1 Linear submodules"`` of a ScriptModule (by their original class names)."""
    from collections import Counter

    kinds = Counter(getattr(m, "original_name", type(m).__name__) for _, m in scripted.named_modules())
    layers = {k: v for k, v in kinds.items() if k in ("Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d")}
    return (" and ".join(f"{v} {k}" for k, v in layers.items()) + " submodules") if layers else "submodules"


def _aten_layers(program) -> str:
    from collections import Counter

    ops = Counter(str(getattr(n.target, "__name__", n.target)).split(".")[0] for n in program.graph.nodes
                  if n.op == "call_function")
    shown = [f"{ops[k]} {k}" for k in ("conv2d", "linear", "batch_norm", "_native_batch_norm_legit_no_training")
             if k in ops]
    return ", ".join(shown) or f"{sum(ops.values())} ops"


def save_model(model: nn.Module, path: Path, fmt: str, example: torch.Tensor) -> Path:
    """Write ``model`` as ``fmt`` (``pickle``: torch.save; ``torchscript``: traced on ``example``;
    ``export``: torch.export.save)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {list(FORMATS)}; got {fmt!r}")
    model = model.eval()
    if fmt == "pickle":
        torch.save(model, path)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the user asked for TorchScript
            torch.jit.trace(model, (example,)).save(str(path))
    else:
        try:  # a batch dimension left free when the model allows it (a batch of 1 would be specialized)
            batch = torch.cat([example, example]) if example.shape[0] == 1 else example
            program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        except Exception:  # noqa: BLE001 - a model specialized to its batch size: export it as it is
            program = torch.export.export(model, (example,))
        torch.export.save(program, str(path))
    return path


def output_format(path: Path, input_format: str) -> str:
    """The format ``--out`` writes: from its suffix (``.pt2``: a ``torch.export`` archive, ``.onnx``:
    ONNX), else the format the model came in."""
    suffix = Path(path).suffix.lower()
    return {".pt2": "export", ".onnx": "onnx"}.get(suffix, input_format)


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """One self-contained ONNX file (TorchScript-based exporter, opset 17, batch dimension dynamic)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices, not the user's concern
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def load_tensor(path: Path, name: str = "--data") -> torch.Tensor:
    """A float tensor from a ``.npy`` file or a ``torch.save``'d tensor."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{name} must be an existing file; got {str(path)!r}")
    try:
        if path.suffix == ".npy":
            t = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInputError(f"{name} must be a .npy array or a tensor saved with torch.save; got "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must hold a tensor; got {type(t).__name__}")
    return t
