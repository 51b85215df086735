"""Reading and writing user models: a pickled ``nn.Module``, TorchScript, or a ``torch.export``
archive, and ONNX on request.

Pruning needs modules to slice (``nn.Conv2d`` / ``nn.Linear`` / BatchNorm) under a forward that
``torch.fx`` traces. A pickled module (``torch.save(model, FILE)``) is pruned directly. A
``torch.export`` archive (``.pt2``) is *lifted* back to such a module
(:func:`lift_exported_program`): its ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` calls
become modules at their parameters' original names, the other ATen ops the torch functions they
stand for, the exported input guards are dropped; an op with no such equivalent, or a ``view`` to a
size the export hard-coded (e.g. a channel shuffle's), is refused by name. A TorchScript file
(scripted or traced) cannot be traced by fx itself (its layers run compiled IR), so it is converted
to a ``torch.export`` program by torch's own converter (``torch._export.converter.TS2EPConverter``,
run on sample inputs of the model's input shape) and lifted the same way
(:func:`lift_torchscript`); data-dependent control flow, a converter failure or an op the lifting
does not map is refused, saying what blocked it. A pruned model is written by :func:`save_model`
as a pickled module, TorchScript (traced) or a ``torch.export`` archive (``torch.export.export`` of
the pruned module, batch dimension free when the model allows), and by :func:`export_onnx` as one
ONNX file.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["FORMATS", "detect_format", "load_model", "save_model", "export_onnx", "load_tensor", "output_format",
           "lift_exported_program", "lift_torchscript"]

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
        if any("code" in n.split("/")[:-1] for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
    return "pickle"


def load_model(path: Path, example: torch.Tensor | None = None) -> tuple[nn.Module, str]:
    """``(module, format)``. Pickled modules are loaded with ``weights_only=False``, which runs the
    file's pickled code: only load files you trust. A ``torch.export`` archive comes back lifted to
    a prunable module (:func:`lift_exported_program`), TorchScript converted and lifted
    (:func:`lift_torchscript`, which needs ``example``: sample inputs ``(N, *input_shape)``).

    Raises :class:`UnsupportedLayerError` for TorchScript and exported graphs that cannot be lifted
    (what blocks), :class:`InvalidInputError` for anything that is not a module, and for TorchScript
    without ``example`` or that does not run on it."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "torchscript":
        if example is None:
            raise InvalidInputError(f"--input-shape (e.g. 3,32,32) or --data must be given with a TorchScript --model "
                                    f"({path.name}): it is converted by running it on sample inputs; got neither")
        return lift_torchscript(path, example), fmt
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
            f"--model must be a pickled nn.Module, TorchScript or a torch.export archive of supported ops; got {name}, "
            f"whose ExportedProgram ({_aten_layers(program)}) cannot be turned back into prunable modules: {why}. "
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


_TS_INSTEAD = ("Pass the Python module instead: torch.save(model, FILE) (its class importable when loading), or a "
               "torch.export archive (torch.export.save(torch.export.export(model, (x,)), FILE.pt2)); a model whose "
               "forward branches on tensor values can be saved with torch.jit.trace(model, (x,)), which records the "
               "branch taken on x")


def lift_torchscript(path: Path, example: torch.Tensor) -> nn.Module:
    """A prunable ``nn.Module`` (as :func:`lift_exported_program` returns) computing what the TorchScript
    file at ``path`` computes: ``torch.jit.load`` (CPU, eval mode), then torch's converter
    ``TS2EPConverter(module, (example,)).convert()`` (an ExportedProgram; ``example``: float inputs of
    shape ``(N, *input_shape)``, N ≥ 2 keeps the batch size unspecialised; retried with only the batch
    dimension dynamic if it fails: :func:`_convert_batch_dynamic`), whose ``aten.convolution`` calls
    (what traced convs record) are read as ``aten.conv2d``, then the lifting of ``.pt2`` archives.
    The result is checked against the TorchScript module on ``example``. The converter's own warnings
    and logs are kept off the console.

    Raises :class:`InvalidInputError` when the module does not run on ``example`` (a wrong
    ``--input-shape``), :class:`UnsupportedLayerError` for data-dependent control flow (the file and
    line of the ``if`` / loop), a converter failure (its message), an op the lifting cannot map, or
    lifted outputs that differ from the TorchScript ones."""
    from torch._export.converter import TS2EPConverter

    path = Path(path)
    name = f"TorchScript {path.name} (converted by torch's TS2EPConverter)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice that TorchScript is deprecated
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - an unreadable archive, in the user's terms
            raise InvalidInputError(f"--model must be a readable TorchScript file; torch.jit.load({path.name!r}) "
                                    f"gives {type(exc).__name__}: {_first_line(exc)}") from exc
    scripted.eval()  # pruning reads inference behaviour (BatchNorm running statistics)
    example = example.detach().float().cpu()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a check run of ours: the model's own notices are not news here
            expected = scripted(example)
    except Exception as exc:  # noqa: BLE001 - the user's model rejects this input shape
        raise InvalidInputError(f"--input-shape must be the per-sample shape {path.name} takes; running it on a "
                                f"{tuple(example.shape)} batch gives {type(exc).__name__}: {_first_line(exc)}") from exc
    branches = (_control_flow_sites(scripted, "prim::If", tensor_condition_only=True)
                + _control_flow_sites(scripted, "prim::Loop", tensor_condition_only=True))
    if branches:
        raise UnsupportedLayerError(
            f"--model must be TorchScript without data-dependent control flow to be pruned; got {path.name}, whose "
            f"forward branches on tensor values ({'; '.join(branches)}): the channel graph is static, and torch's "
            f"converter would keep only one branch or fail. {_TS_INSTEAD}")
    try:
        with _quiet_torch():
            try:
                program = TS2EPConverter(scripted, (example,)).convert()
            except Exception as first:  # noqa: BLE001 - retried with the spatial sizes fixed, else reported
                try:
                    program = _convert_batch_dynamic(scripted, example)
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    raise first from None
    except Exception as exc:  # noqa: BLE001 - whatever the converter raises, said in the user's terms
        why = _first_line(exc)
        if "prim::Loop" in why:  # the converter has no TorchScript loops; say where they are
            loops = _control_flow_sites(scripted, "prim::Loop", tensor_condition_only=False)[:3]
            why += (f" (a for/while loop in forward{': ' + '; '.join(loops) if loops else ''}: the converter does "
                    "not convert TorchScript loops; torch.jit.trace unrolls them)")
        elif "warn is implemented" in why:
            why += " (a warnings.warn call in forward, which the converter cannot convert; torch.jit.trace drops it)"
        raise UnsupportedLayerError(
            f"--model must be TorchScript that torch's converter (torch._export.converter.TS2EPConverter) turns "
            f"into a torch.export program; got {path.name} ({_script_layers(scripted)}), on which it fails: "
            f"{type(exc).__name__}: {why}. {_TS_INSTEAD}") from exc
    _parameters_as_in(program, {n for n, _ in scripted.named_parameters()})
    _convolutions_as_conv2d(program, lambda why: UnsupportedLayerError(
        f"--model must be TorchScript of supported ops; got {path.name}, whose {why} cannot be pruned. {_TS_INSTEAD}"))
    lifted = lift_exported_program(program, name)
    with torch.no_grad():
        got = lifted(example)
    if not isinstance(expected, torch.Tensor):
        raise UnsupportedLayerError(f"--model must return one tensor to be pruned; got {path.name}, which returns "
                                    f"{type(expected).__name__}")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not torch.allclose(
            got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp_min(1.0))):
        raise UnsupportedLayerError(  # a guard against converter specialisations, never seen on the tested nets
            f"--model must be TorchScript whose conversion computes what it computes; got {name}, whose converted "
            f"module's output differs from torch.jit.load's on the sample inputs. {_TS_INSTEAD}")
    return lifted


@contextlib.contextmanager
def _quiet_torch():
    """Keep the converter's warnings (unused ``num_batches_tracked`` buffers, ``if self.training``
    specialised to eval) and torch's log records (graph dumps, symbolic-shape solver tracebacks it
    recovers from) off the console: they are about torch's internals, not the user's model."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch", "torch._export.converter", "torch.export",
                                              "torch.fx.experimental.symbolic_shapes")]
    loggers += [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch.")]
    disabled = [(log, log.disabled) for log in dict.fromkeys(loggers)]
    try:
        for log, _ in disabled:
            log.disabled = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, was in disabled:
            log.disabled = was


def _convert_batch_dynamic(scripted, example: torch.Tensor):
    """``TS2EPConverter(scripted, (example,)).convert()`` with only the batch dimension dynamic.

    The converter retraces with every dimension ``Dim.AUTO``; sympy cannot always solve the guards
    that fixed-size layers put on symbolic spatial sizes (AlexNet's 9,216-input classifier after
    adaptive pooling: ``NotImplementedError: The inequality ... cannot be solved``). Pruning never
    changes the input's spatial size, so fixing it loses nothing. Torch's retrace call is swapped for
    the duration of this one conversion (torch is pinned; the converter takes no shape argument)."""
    from unittest import mock

    import torch.export._trace as export_trace
    from torch._export.converter import TS2EPConverter

    retrace = export_trace._export

    def batch_dynamic(module, args, *rest, dynamic_shapes=None, **kwargs):
        return retrace(module, args, *rest, dynamic_shapes=({0: torch.export.Dim.AUTO},), **kwargs)

    with mock.patch.object(export_trace, "_export", batch_dynamic):
        return TS2EPConverter(scripted, (example,)).convert()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [""])[0][:300]


_TENSOR_TO_PYTHON = ("aten::Bool", "aten::is_nonzero", "aten::item", "aten::Float", "aten::Int",
                     "aten::ScalarImplicit")


def _control_flow_sites(scripted, kind: str, tensor_condition_only: bool) -> list[str]:
    """``'File "net.py", line 12: `if y.mean() > 0:`'`` for each ``kind`` node (``prim::If`` /
    ``prim::Loop``) of the module's forward, submodules inlined, from the archive's debug info;
    ``tensor_condition_only``: only those whose condition reads a tensor's values (``bool(t)``,
    ``t.item()``, ``float(t)`` among the scalar ops it is computed from): branches on attributes
    (``self.training``) or shapes (BatchNorm's input-rank check) are constant for the converter."""
    def reads_tensor_values(value) -> bool:
        todo, seen = [value], set()
        while todo:  # back through the scalar computation only: a tensor's shape is not its values
            node = todo.pop().node()
            if node.kind() in _TENSOR_TO_PYTHON:
                return True
            for v in node.inputs():
                if not isinstance(v.type(), torch._C.TensorType) and v.debugName() not in seen:
                    seen.add(v.debugName())
                    todo.append(v)
        return False

    found = []
    condition = 0 if kind == "prim::If" else 1  # prim::Loop(max_trip_count, condition, ...)
    graph = scripted.inlined_graph  # held: its nodes die with it
    for node in graph.findAllNodes(kind, True):
        inputs = list(node.inputs())
        if tensor_condition_only and (len(inputs) <= condition or not reads_tensor_values(inputs[condition])):
            continue
        try:
            where = node.sourceRange()
        except Exception:  # noqa: BLE001 - no debug info in the archive
            where = ""
        lines = where.splitlines()
        head = lines[0].strip() if lines else "forward"
        marks = [k for k, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"~"}]
        code = lines[marks[0] - 1].strip() if marks and marks[0] > 0 else ""
        found.append(f"{head}: `{code}`" if code else head)
    return found


def _parameters_as_in(program, parameter_names: set[str]) -> None:
    """Mark the parameters of ``program`` as the TorchScript module names them, in place: the
    converter tells parameters from buffers by comparing values with ``parameters()``, which for a
    ``torch.jit.load``-ed module yields plain tensors (so every weight came out a buffer)."""
    import dataclasses

    from torch.export.graph_signature import InputKind

    specs = program.graph_signature.input_specs
    for i, spec in enumerate(specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target is not None:
            is_param = spec.target in parameter_names
            specs[i] = dataclasses.replace(spec, kind=InputKind.PARAMETER if is_param else InputKind.BUFFER,
                                           persistent=None if is_param else True)
            value = program.state_dict[spec.target].detach()
            program.state_dict[spec.target] = nn.Parameter(value) if is_param else value


def _convolutions_as_conv2d(program, refuse) -> None:
    """Rewrite the ``aten.convolution`` calls of ``program`` (traced TorchScript records
    ``aten::_convolution``) as the ``aten.conv2d`` calls the lifting reads, in place; transposed or
    non-2d convolutions are refused. Unused ops (BatchNorm's ``dim`` checks) are dropped."""
    aten = torch.ops.aten
    graph = program.graph_module.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.convolution.default:
            v = _bound(node)
            weight = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
            if v["transposed"] or weight is None or weight.dim() != 4:
                kind = "transposed convolution" if v["transposed"] else "convolution that is not 2-d"
                raise refuse(f"{kind} ({node.name})")
            node.target = aten.conv2d.default
            node.args, node.kwargs = (v["input"], v["weight"], v["bias"], v["stride"], v["padding"], v["dilation"],
                                      v["groups"]), {}
    graph.eliminate_dead_code()
    program.graph_module.recompile()


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
