"""Convert a PyTorch model into the numpy network IR (:class:`solvers.Network`) for verification.

Supported modules: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero padding), ``nn.ReLU``,
``nn.MaxPool2d``, ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d`` (to a size dividing the input, e.g. 1×1),
``nn.Flatten``, ``nn.BatchNorm1d/2d`` (running statistics; folded into the preceding Linear/Conv, else
an input ``Normalize``), ``nn.Dropout`` and ``nn.Identity`` (skipped: inference semantics), nested
``nn.Sequential``. Other containers are traced with ``torch.fx``; in the trace, ``F.relu`` /
``torch.relu``, ``F.max_pool2d`` / ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d``, ``torch.flatten`` /
``.view`` / ``.reshape`` to a vector (``x.view(x.size(0), -1)`` too) and residual ``+`` are also
understood. Anything else raises :class:`UnsupportedLayerError` naming the module or operation.

The model is never modified: weights are copied out as float64 arrays.
"""
from __future__ import annotations

import operator
from typing import Sequence

import numpy as np
import torch
from torch import nn

from solvers.errors import InvalidInputError, UnsupportedLayerError
from solvers.network.layers import (Add, AvgPool2d, Branch, Conv2d, Dense, Flatten, MaxPool2d, Normalize, ReLU, check_folded,
                                     require_finite)
from solvers.network.ir import Network

__all__ = ["to_network"]

_SKIP = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy().copy()


class _Builder:
    def __init__(self, input_shape: tuple):
        self.input_shape = input_shape
        self.layers: list = []
        self.names: list = []
        self.shapes = [input_shape]

    @property
    def last(self) -> int:
        return len(self.layers)

    def add(self, layer, name: str) -> int:
        shape = self.shapes[layer.source] if isinstance(layer, Branch) else layer.output_shape(self.shapes[-1])
        self.layers.append(layer)
        self.names.append(name)
        self.shapes.append(tuple(shape))
        return self.last

    def flatten(self, name: str) -> int:
        if len(self.shapes[-1]) == 1:
            return self.last
        return self.add(Flatten(), name)

    def module(self, name: str, m: nn.Module, can_fold: bool = True) -> int:
        """Append the layer(s) for leaf module ``m``; returns the activation index of its output.

        ``can_fold``: whether a BatchNorm may be folded into the previous layer (its input is read by
        nothing else)."""
        if isinstance(m, _SKIP):
            return self.last
        if isinstance(m, nn.Linear):
            b = _np(m.bias) if m.bias is not None else None
            return self.add(Dense(_np(m.weight), b), name)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedLayerError(f"module '{name}' (Conv2d) must have groups=1; got groups={m.groups}")
            if m.padding_mode != "zeros":
                raise UnsupportedLayerError(f"module '{name}' (Conv2d) must use zero padding; got "
                                            f"padding_mode={m.padding_mode!r}")
            pad = m.padding
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0, 0)
                else:  # "same": symmetric only when dilation·(k − 1) is even
                    tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
                    if any(t % 2 for t in tot):
                        raise UnsupportedLayerError(f"module '{name}' (Conv2d): padding='same' would be "
                                                    f"asymmetric for kernel {m.kernel_size}")
                    pad = tuple(t // 2 for t in tot)
            b = _np(m.bias) if m.bias is not None else None
            return self.add(Conv2d(_np(m.weight), b, stride=m.stride, padding=pad, dilation=m.dilation), name)
        if isinstance(m, nn.ReLU):
            return self.add(ReLU(), name)
        if isinstance(m, nn.Flatten):
            if m.start_dim not in (1, -len(self.shapes[-1]) - 1) or m.end_dim != -1:
                raise UnsupportedLayerError(f"module '{name}' (Flatten) must flatten all but the batch axis "
                                            f"(start_dim=1, end_dim=-1); got {m.start_dim}, {m.end_dim}")
            return self.flatten(name)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(name, m, can_fold)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return self.pool(name, m)
        raise UnsupportedLayerError(f"module '{name}' has type {type(m).__name__}: only Linear, Conv2d, ReLU, "
                                    "Flatten, BatchNorm1d/2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, "
                                    "Identity and Sequential are supported")

    def pool(self, name: str, m) -> int:
        """MaxPool2d / AvgPool2d (floor mode, or a ceil mode that changes nothing) and AdaptiveAvgPool2d
        to an output size that divides the input (e.g. 1×1, global average pooling)."""
        shape = self.shapes[-1]
        label = f"module '{name}' ({type(m).__name__})"
        if len(shape) != 3:
            raise UnsupportedLayerError(f"{label} expects a (C, H, W) input; got shape {shape}")
        if isinstance(m, nn.AdaptiveAvgPool2d):
            out = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
            out = tuple(shape[1 + k] if o is None else int(o) for k, o in enumerate(out))
            if any(n % o for n, o in zip(shape[1:], out)):
                raise UnsupportedLayerError(f"{label}: output size {out} must divide the input size {shape[1:]}")
            k = tuple(n // o for n, o in zip(shape[1:], out))
            return self.add(AvgPool2d(k, k), name)
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            raise UnsupportedLayerError(f"{label} must have return_indices=False")
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
            raise UnsupportedLayerError(f"{label} must have divisor_override=None; got {m.divisor_override}")
        try:
            if isinstance(m, nn.MaxPool2d):
                layer = MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation)
            else:
                layer = AvgPool2d(m.kernel_size, m.stride, m.padding, bool(m.count_include_pad))
            layer.output_shape(shape)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{label}: {exc}") from None
        if m.ceil_mode:
            dil = layer.dilation if isinstance(layer, MaxPool2d) else (1, 1)
            for n, kk, st, p, d in zip(shape[1:], layer.kernel, layer.stride, layer.padding, dil):
                if (n + 2 * p - d * (kk - 1) - 1) % st:
                    raise UnsupportedLayerError(f"{label}: ceil_mode=True changes the output shape here; "
                                                "use ceil_mode=False")
        return self.add(layer, name)

    def batchnorm(self, name: str, m, can_fold: bool = True) -> int:
        if m.running_mean is None or m.running_var is None:
            raise UnsupportedLayerError(f"module '{name}' ({type(m).__name__}) has no running statistics "
                                        "(track_running_stats=False); cannot fold it")
        s = (_np(m.weight) if m.weight is not None else 1.0) / np.sqrt(_np(m.running_var) + m.eps)
        s = np.broadcast_to(s, (m.num_features,)).astype(np.float64)
        t = (_np(m.bias) if m.bias is not None else 0.0) - s * _np(m.running_mean)
        for what, arr in (("scale (weight / sqrt(running_var + eps))", s), ("shift", t)):
            require_finite(f"module '{name}' ({type(m).__name__}) {what}", arr,
                           " (check its running statistics and affine parameters)")
        shape = self.shapes[-1]
        if shape[0] != m.num_features:
            raise InvalidInputError(f"module '{name}' expects {m.num_features} channels; got input shape {shape}")
        prev = self.layers[-1] if self.layers and can_fold else None
        if isinstance(prev, Dense) and len(shape) == 1:
            prev.weight = prev.weight * s[:, None]
            prev.bias = prev.bias * s + t
            return self._folded(name, m)
        if isinstance(prev, Conv2d):
            prev.weight = prev.weight * s[:, None, None, None]
            prev.bias = prev.bias * s + t
            return self._folded(name, m)
        if np.any(s == 0):
            raise UnsupportedLayerError(f"module '{name}' ({type(m).__name__}) has a zero scale and no "
                                        "preceding Linear/Conv2d to fold it into")
        cshape = (m.num_features,) + (1,) * (len(shape) - 1)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            mean, std = (-t / s).reshape(cshape), (1.0 / s).reshape(cshape)
        try:
            layer = Normalize(mean, std)
        except InvalidInputError as exc:
            raise InvalidInputError(f"module '{name}' ({type(m).__name__}) as an input normalization: {exc}") from None
        return self.add(layer, name)

    def _folded(self, name: str, m) -> int:
        """After BatchNorm ``m`` was folded into the last layer: check the products, naming the module."""
        check_folded(self.layers, self.names, f"module '{name}' ({type(m).__name__})")
        return self.last


# functional pooling in a traced forward → the module with the same arguments (names in call order)
_POOL_FUNCTIONS = {
    nn.functional.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                              "return_indices")),
    nn.functional.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                              "divisor_override")),
    nn.functional.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}


def _walk_sequential(b: _Builder, prefix: str, seq: nn.Sequential) -> None:
    for child_name, child in seq.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.Sequential):
            _walk_sequential(b, name, child)
        else:
            b.module(name, child)


def _trace(b: _Builder, model: nn.Module) -> None:
    """Walk a ``torch.fx`` trace of ``model`` (a chain of supported modules/functions, residual adds)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise UnsupportedLayerError(f"model of type {type(model).__name__} is not an nn.Sequential and could "
                                    f"not be traced with torch.fx ({type(exc).__name__}: {exc})") from None
    modules = dict(gm.named_modules())
    act: dict = {}
    sizes: set = set()   # x.size(…) nodes: shapes, not tensors
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if act:
                raise UnsupportedLayerError("the model must take exactly one input tensor")
            act[node] = 0
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) or out not in act:
                raise UnsupportedLayerError("the model must return one tensor computed from its input")
            if act[out] != b.last:
                b.add(Branch(act[out]), "output")
            return
        if node.op == "get_attr":
            raise UnsupportedLayerError(f"operation '{node.name}' reads parameter '{node.target}' directly; "
                                        "only module calls are supported")
        if node.op == "call_method" and node.target == "size":   # the batch size of x.view(x.size(0), -1)
            sizes.add(node)
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and a not in sizes]
        fn = node.target
        is_add = node.op == "call_function" and fn in (operator.add, torch.add) or \
            node.op == "call_method" and fn == "add"
        if is_add and len(tensor_args) == 2:
            i, j = act[tensor_args[0]], act[tensor_args[1]]
            if b.last not in (i, j):   # both operands are earlier: continue from one of them
                i = b.add(Branch(i), f"{node.name}_branch")
            cur, other = (i, j) if i == b.last else (j, i)
            act[node] = b.add(Add(source=other), node.name)
            continue
        if len(tensor_args) > 1:
            raise UnsupportedLayerError(f"operation '{node.name}' combines {len(tensor_args)} tensors; only "
                                        "single-input operations joined by residual adds are supported")
        if tensor_args and act.get(tensor_args[0]) != b.last:   # a second path, e.g. a downsampling shortcut
            if tensor_args[0] not in act:
                raise UnsupportedLayerError(f"operation '{node.name}' reads a value that is not computed from the "
                                            "model's input tensor")
            b.add(Branch(act[tensor_args[0]]), f"{node.name}_branch")
        if node.op == "call_module":
            sole = all(len(a.users) == 1 for a in tensor_args)
            act[node] = b.module(str(node.target), modules[node.target], can_fold=sole)
        elif node.op == "call_function" and fn in (torch.relu, nn.functional.relu):
            act[node] = b.add(ReLU(), node.name)
        elif node.op == "call_function" and fn in _POOL_FUNCTIONS:
            cls, names = _POOL_FUNCTIONS[fn]
            kw = dict(zip(names, node.args[1:]))
            kw.update(node.kwargs)
            if any(isinstance(v, fx.Node) for v in kw.values()):
                raise UnsupportedLayerError(f"operation '{node.name}' ({fn.__name__}) must have constant arguments")
            act[node] = b.pool(node.name, cls(**kw))
        elif (node.op == "call_function" and fn is torch.flatten) or (
                node.op == "call_method" and fn in ("flatten", "view", "reshape")):
            rest = node.args[1:] + tuple(node.kwargs.values())
            if fn in ("view", "reshape"):
                shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                ok = len(shape) == 2 and shape[-1] in (-1, int(np.prod(b.shapes[-1])))
                if ok and isinstance(shape[0], fx.Node):   # only the batch size, x.size(0)
                    ok = shape[0] in sizes and tuple(shape[0].args[1:]) + tuple(shape[0].kwargs.values()) == (0,)
            else:
                ok = list(rest) in ([], [1])
            if not ok:
                raise UnsupportedLayerError(f"operation '{node.name}' ({fn}) must flatten all but the batch "
                                            f"axis; got arguments {rest}")
            act[node] = b.flatten(node.name)
        else:
            raise UnsupportedLayerError(f"operation '{node.name}' ({node.op} {getattr(fn, '__name__', fn)}) is "
                                        "not supported: only Linear, Conv2d, ReLU, Flatten, BatchNorm, "
                                        "pooling modules, Dropout, Identity and residual add")


def to_network(model: nn.Module, input_shape: Sequence[int] | int) -> Network:
    """The numpy IR of ``model`` (float64 copies of its weights; the model is not modified).

    Parameters
    ----------
    model : nn.Module
        A ReLU network made of the supported modules (see the module docstring).
    input_shape : tuple of int or int
        Shape of one sample without the batch axis, e.g. ``(1, 28, 28)`` or ``784``.

    Returns
    -------
    solvers.Network
        Its ``forward`` matches ``model`` in float64 and eval mode (BatchNorm running statistics,
        Dropout off).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    shape = (int(input_shape),) if isinstance(input_shape, (int, np.integer)) else tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise InvalidInputError(f"input_shape must be positive sizes of one sample (no batch axis); got {input_shape}")
    b = _Builder(shape)
    if isinstance(model, nn.Sequential):
        _walk_sequential(b, "", model)
    elif not list(model.children()):
        b.module(type(model).__name__, model)
    else:
        _trace(b, model)
    return Network(b.layers, shape, names=b.names)
