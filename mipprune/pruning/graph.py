"""Channel dependency analysis: which layer pairs can lose channels together, found with torch.fx.

A *prune group* is a producer layer (``nn.Conv2d`` / ``nn.Linear``) whose output channels feed exactly
one consumer layer through channel-wise operations only (activations, BatchNorm, pooling, dropout,
flatten, identity). Removing channel ``c`` removes row ``c`` of the producer (and of its BatchNorm)
and the input columns of the consumer that read it; nothing else in the network sees that channel.

Anything else between two prunable layers — a residual add, a concat, a grouped convolution, a tensor
read by several layers, a module called twice — makes the pair ungroupable, and it is skipped: the
channels there are shared with something we would also have to cut (Torch-Pruning's dependency
groups); here we keep to the pairs that can be cut alone.

The analysis runs on the graph from :func:`torch.fx.symbolic_trace`. With an example input, shapes
are propagated through the graph (``ShapeProp``) and every step is checked against them (which also
tells how many consumer columns belong to each channel after a ``Flatten``); without one, module
attributes and the syntax of flatten calls decide. A model that cannot be traced falls back to the
order of its modules if it is an ``nn.Sequential``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["PruneGroup", "find_prune_groups", "prunable_layers"]


@dataclass(frozen=True)
class PruneGroup:
    """Channels that can be removed together: the outputs of ``producer`` = the inputs of ``consumer``.

    Attributes
    ----------
    consumer : str
        Qualified module name of the ``nn.Conv2d`` / ``nn.Linear`` whose input channels are selected.
    producer : str
        Qualified name of the ``nn.Conv2d`` / ``nn.Linear`` that produces those channels.
    batchnorms : tuple of str
        ``BatchNorm1d`` / ``BatchNorm2d`` modules between the two (sliced with the producer).
    n_channels : int
        ``C``, the producer's output channels (``out_features`` for a Linear producer).
    columns_per_channel : int
        Consumer-input columns per channel: ``kh*kw`` for a conv consumer, ``H*W`` for a Linear fed by
        a flattened conv map, ``1`` for Linear after Linear. Channel ``c`` owns the contiguous columns
        ``c*cols … (c+1)*cols − 1`` (the order of ``F.unfold`` and ``torch.flatten``).
    """

    consumer: str
    producer: str
    batchnorms: tuple[str, ...]
    n_channels: int
    columns_per_channel: int


def is_prunable_module(module: nn.Module) -> bool:
    """``True`` for the layer types whose channels mipprune selects (``nn.Conv2d``, ``nn.Linear``)."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


# --------------------------------------------------------------------------- op classification
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACT_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


@dataclass(eq=False)
class _Op:
    """One operation of the forward pass, reduced to what the channel analysis needs."""

    kind: str                          # input | layer | act | bn | pool | flatten | other
    name: str                          # module name (module ops) or node name
    module: nn.Module | None = None
    source: "_Op | None" = None        # the op producing the (single) data input
    n_users: int = 1                   # ops reading this op's output as data (shape queries excluded)
    extra_inputs: bool = False         # reads another tensor besides ``source`` (add, cat, …)
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    flattens_from_dim1: bool = False   # syntactically ``flatten(x, 1)`` / ``view(x.size(0), -1)``
    calls: int = 1                     # times the module is called in one forward


def _classify_module(module: nn.Module) -> str:
    if is_prunable_module(module):
        return "layer"
    if isinstance(module, _BN_MODULES):
        return "bn"
    if isinstance(module, _POOL_MODULES) and not getattr(module, "return_indices", False):
        return "pool"
    if isinstance(module, nn.Flatten):
        return "flatten"
    if isinstance(module, _ACT_MODULES):
        return "act"
    return "other"


def _is_shape_value(node) -> bool:
    """``True`` for fx nodes computing sizes (``x.size(0)``, ``x.shape[0]``, products of those)."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS:
            return True
        if node.target in (operator.getitem, operator.mul, operator.floordiv, operator.add):
            return all(_is_shape_value(a) for a in node.args if isinstance(a, torch.fx.Node))
    return False


def _node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _flatten_syntax(node: torch.fx.Node) -> bool:
    """Whether a flatten/view/reshape node provably flattens dims 1… into one (batch dim kept)."""
    args, kw = node.args, node.kwargs
    if node.target in (torch.flatten,) or (node.op == "call_method" and node.target == "flatten"):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        return start == 1 and end == -1
    # view / reshape: (x.size(0), -1) given as separate args or one tuple
    dims = args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if len(dims) != 2 or dims[1] != -1:
        return False
    first = dims[0]
    if not isinstance(first, torch.fx.Node):
        return False
    src = args[0]
    if first.op == "call_method" and first.target == "size":
        return first.args[0] is src and (first.args[1:] == (0,) or first.kwargs.get("dim") == 0)
    if first.op == "call_function" and first.target is operator.getitem and first.args[1] == 0:
        shape = first.args[0]
        return (isinstance(shape, torch.fx.Node) and shape.op == "call_function" and shape.target is getattr
                and shape.args == (src, "shape"))
    return False


def _fx_ops(gm: torch.fx.GraphModule) -> list[_Op]:
    """Reduce a traced graph to ``_Op`` records (shapes filled in if ShapeProp ran)."""
    modules = dict(gm.named_modules())
    ops: dict[torch.fx.Node, _Op] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        data_args = [a for a in node.all_input_nodes if not _is_shape_value(a)]
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        op = _Op(kind="other", name=node.name)
        if node.op == "placeholder":
            op.kind = "input"
        elif node.op == "call_module":
            module = modules[node.target]
            op.kind, op.name, op.module = _classify_module(module), node.target, module
            op.calls = calls[node.target]
            if op.kind == "flatten":
                op.flattens_from_dim1 = module.start_dim == 1 and module.end_dim == -1
        elif node.op == "call_function":
            if node.target in _ACT_FUNCTIONS:
                op.kind = "act"
            elif node.target in _POOL_FUNCTIONS and not node.kwargs.get("return_indices", False):
                op.kind = "pool"
            elif node.target is torch.flatten:
                op.kind, op.flattens_from_dim1 = "flatten", _flatten_syntax(node)
        elif node.op == "call_method":
            if node.target in _ACT_METHODS:
                op.kind = "act"
            elif node.target in _RESHAPE_METHODS:
                op.kind, op.flattens_from_dim1 = "flatten", _flatten_syntax(node)
        if op.kind not in ("input", "other"):
            # a channel-wise op must read exactly one tensor, its first argument
            op.source = ops.get(first) if first is not None else None
            op.extra_inputs = any(a is not first for a in data_args) or first is None
        if node.op != "placeholder":
            op.in_shape = _node_shape(first) if first is not None else None
        op.out_shape = _node_shape(node)
        op.n_users = sum(1 for u in node.users if not _is_shape_value(u))
        ops[node] = op
    return list(ops.values())


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Modules of nested ``nn.Sequential`` containers, in order (other modules are leaves)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, full)
        else:
            yield full, child


def _sequential_ops(model: nn.Sequential, example_input: torch.Tensor | None) -> list[_Op]:
    """``_Op`` chain of an ``nn.Sequential`` that fx could not trace, shapes from forward hooks."""
    leaves = list(_leaves(model))
    counts: dict[int, int] = {}
    for _, m in leaves:
        counts[id(m)] = counts.get(id(m), 0) + 1
    ops: list[_Op] = [_Op(kind="input", name="input")]
    for name, m in leaves:
        kind = _classify_module(m)
        op = _Op(kind=kind, name=name, module=m, source=ops[-1], calls=counts[id(m)])
        if kind == "flatten":
            op.flattens_from_dim1 = m.start_dim == 1 and m.end_dim == -1
        ops.append(op)
    if example_input is not None:
        shapes: dict[str, tuple] = {}
        handles = []

        def hook(name):
            def fn(_m, inputs, output):
                if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
            return fn

        try:
            for name, m in leaves:
                handles.append(m.register_forward_hook(hook(name)))
            _run(model, example_input)
        finally:
            for h in handles:
                h.remove()
        for op in ops[1:]:
            op.in_shape, op.out_shape = shapes.get(op.name, (None, None))
    return ops


def expected_input(model: nn.Module) -> str:
    """What ``model`` takes, in words, from its first Embedding / Conv2d / Linear (for error messages)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            return f"(N, L) integer token ids below {mod.num_embeddings} (its first Embedding is {name!r})"
        if isinstance(mod, nn.Conv2d):
            n = mod.in_channels
            return f"(N, {n}, H, W) images (its first Conv2d, {name!r}, has {n} input channel{'s' * (n != 1)})"
        if isinstance(mod, nn.Linear):
            n = mod.in_features
            return f"(N, …, {n}) inputs (its first Linear, {name!r}, has {n} input feature{'s' * (n != 1)})"
    return "the inputs its forward accepts"


def _run(model: nn.Module, example_input: torch.Tensor):
    with evaluation_mode(model):
        try:
            return model(prepare_input(model, example_input))
        except Exception as exc:  # the user's model rejected the input: say which argument is wrong
            raise InvalidInputError(
                f"example_input must run through the model; got {type(exc).__name__}: {exc}") from exc


def trace_blocker(tracer: torch.fx.Tracer, exc: BaseException) -> str:
    """Where an fx trace failed: `` in module 'name' (Class) at file:line `code` `` (the innermost
    module being traced and the last line of user code in the traceback), or ``""``."""
    import os
    import traceback

    where = ""
    stack = list(getattr(tracer, "module_stack", {}).values())
    if stack and stack[-1][0]:
        path, cls = stack[-1]
        where += f" in module {path!r} ({getattr(cls, '__name__', cls)})"
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and not os.path.abspath(f.filename).startswith(here)]
    if frames:
        f = frames[-1]
        where += f" at {os.path.basename(f.filename)}:{f.lineno}" + (f" `{f.line.strip()}`" if f.line else "")
    return where


def fx_trace(model: nn.Module, requirement: str = "model must be traceable by torch.fx.symbolic_trace"
             ) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; on failure :class:`UnsupportedLayerError` with fx's message
    and what blocked it (:func:`trace_blocker`: the module and the line of its forward)."""
    tracer = torch.fx.Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise UnsupportedLayerError(f"{requirement}; got {type(exc).__name__}: {exc}{trace_blocker(tracer, exc)}"
                                    ) from exc
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _operations(model: nn.Module, example_input: torch.Tensor | None) -> list[_Op]:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    try:
        gm = fx_trace(model, "model must be traceable by torch.fx.symbolic_trace (or be an nn.Sequential)")
    except UnsupportedLayerError:
        if isinstance(model, nn.Sequential):
            return _sequential_ops(model, example_input)
        raise
    if example_input is not None:
        _run(model, example_input)  # a clean error for a bad input (ShapeProp prints tracebacks)
        # ShapeProp runs the traced copy, which shares the model's modules: eval mode, no_grad
        with evaluation_mode(gm):
            try:
                ShapeProp(gm).propagate(prepare_input(model, example_input))
            except Exception as exc:
                raise InvalidInputError(
                    f"example_input must run through the model; got {type(exc).__name__}: {exc}") from exc
    return _fx_ops(gm)


# --------------------------------------------------------------------------- group rules
def _n_out(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _columns_per_channel(producer: _Op, chain: list[_Op], consumer: _Op) -> int | None:
    """Columns per channel if ``producer → chain → consumer`` is channel-wise, else ``None``."""
    P, Q = producer.module, consumer.module
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for m in (P, Q)):
        return None
    C = _n_out(P)
    conv_map = isinstance(P, nn.Conv2d)
    flattened = False
    shape_cols = None
    for op in chain:
        known = op.in_shape is not None and op.out_shape is not None
        if op.kind == "act":
            if known and op.in_shape != op.out_shape:
                return None
        elif op.kind == "bn":
            bn = op.module
            if bn.num_features != C or flattened:
                return None
            if conv_map != isinstance(bn, nn.BatchNorm2d):
                return None
            if not conv_map and known and len(op.in_shape) != 2:
                return None  # BatchNorm1d on (N, T, F) normalizes dim 1, not the features
        elif op.kind == "pool":
            if not conv_map or flattened:
                return None
            if known and not (len(op.in_shape) == len(op.out_shape) == 4 and op.in_shape[1] == op.out_shape[1] == C):
                return None
        elif op.kind == "flatten":
            if known:
                if op.in_shape == op.out_shape:
                    continue  # a no-op reshape
                s, t = op.in_shape, op.out_shape
                if (conv_map and not flattened and len(s) == 4 and s[1] == C and len(t) == 2
                        and t[0] == s[0] and t[1] == math.prod(s[1:])):
                    flattened, shape_cols = True, s[2] * s[3]
                    continue
                return None
            if not conv_map or flattened or not op.flattens_from_dim1:
                return None
            flattened = True
        else:
            return None
    if isinstance(Q, nn.Conv2d):
        if not conv_map or flattened or Q.in_channels != C:
            return None
        return Q.kernel_size[0] * Q.kernel_size[1]
    if conv_map:
        if not flattened or Q.in_features % C:
            return None
        cols = Q.in_features // C
        if shape_cols is not None and cols != shape_cols:
            return None
        if consumer.in_shape is not None and len(consumer.in_shape) != 2:
            return None
        return cols
    if Q.in_features != C:
        return None
    return 1


def _group_for(consumer: _Op) -> PruneGroup | None:
    chain: list[_Op] = []
    op = consumer.source
    while op is not None and op.kind in ("act", "bn", "pool", "flatten"):
        if op.n_users != 1 or op.extra_inputs or op.calls != 1:
            return None
        chain.append(op)
        op = op.source
    if op is None or op.kind != "layer":
        return None
    producer = op
    if producer.n_users != 1 or producer.calls != 1 or consumer.calls != 1 or consumer.extra_inputs:
        return None
    chain.reverse()
    cols = _columns_per_channel(producer, chain, consumer)
    if cols is None:
        return None
    bns = tuple(o.name for o in chain if o.kind == "bn")
    return PruneGroup(consumer=consumer.name, producer=producer.name, batchnorms=bns,
                      n_channels=_n_out(producer.module), columns_per_channel=cols)


def find_prune_groups(model: nn.Module, example_input: torch.Tensor | None = None) -> list[PruneGroup]:
    """All prune groups of ``model``, in forward order of their consumers.

    Parameters
    ----------
    model : nn.Module
        Traced with ``torch.fx.symbolic_trace`` (an untraceable ``nn.Sequential`` is read in module
        order). The model is not modified (it runs once in eval mode if ``example_input`` is given).
    example_input : tensor, optional
        A batch the model accepts, e.g. ``(1, 3, 32, 32)``. With it, tensor shapes are propagated and
        checked at every step (recommended); without it, module attributes and the syntax of the
        flatten calls decide (``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``).

    Returns
    -------
    list of PruneGroup
        One per consumer whose input channels can be removed alone; pairs joined by anything else
        (residual add, concat, grouped conv, shared tensors or modules) are left out.

    Raises
    ------
    UnsupportedLayerError
        If the model cannot be traced and is not an ``nn.Sequential``.
    InvalidInputError
        If ``example_input`` does not run through the model.
    """
    groups = []
    for op in _operations(model, example_input):
        if op.kind == "layer":
            group = _group_for(op)
            if group is not None:
                groups.append(group)
    return groups


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` in forward order.

    Forward order comes from the fx trace, which lists only the modules the forward calls as
    modules (a Linear used through its ``weight`` by a fused op is left out: hooks never see it).
    A model that cannot be traced gives module order (``named_modules``).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable: module order is the best we know
        return [name for name, m in model.named_modules() if is_prunable_module(m)]
    modules = dict(gm.named_modules())
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_prunable_module(modules[node.target]) and node.target not in names:
            names.append(node.target)
    return names
