"""Read a feed-forward ReLU network from an ONNX file into the layers of the numpy IR
(:mod:`solvers.network.layers`); ``solvers.Network.from_onnx`` assembles them into a network.

Supported operators: ``Gemm`` (transB, alpha, beta; ``transA`` only on the constant side), ``MatMul``
(activation × constant), ``Add`` / ``Sub`` / ``Mul`` / ``Div`` / ``Neg`` with a constant (folded into the
preceding Dense/Conv/Normalize layer where possible, else a ``Normalize`` layer), ``Add`` of two
activations (residual ``Add`` layer), ``Relu``, ``Flatten``, ``Reshape``, ``Conv`` (2-D, symmetric
pads, strides, dilations, ``group=1``), ``MaxPool`` / ``AveragePool`` (2-D, symmetric pads, floor
mode), ``GlobalAveragePool``, ``BatchNormalization`` (inference form, folded into the
preceding Conv/Gemm), ``Identity``, ``Dropout`` (inference: identity), ``Constant`` and initializers.
Any node whose inputs are all constants (e.g. the ``Shape → Gather → Concat`` chains that feed a
``Reshape``) is evaluated once with ``onnx.reference``. Every other operator raises
:class:`UnsupportedLayerError` naming the node and its op.

Shapes: the first axis of the graph input is the batch axis and is dropped (a rank-1 input has none).
Per-sample tensors of rank 3 are ``(C, H, W)`` images; any other per-sample shape is treated as a flat
vector of the same size in row-major order — e.g. the VNN-COMP MNIST networks declare input
``1 × 784 × 1``, which becomes 784 flat inputs, matching the ``X_0 … X_783`` of their properties.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from solvers.errors import InvalidInputError, UnsupportedLayerError
from solvers.network.layers import (Add, AvgPool2d, Branch, Conv2d, Dense, Flatten, MaxPool2d, Normalize, ReLU, check_folded,
                                     require_finite)

__all__ = ["read_onnx"]

# what the reader (and the verifier behind it) handles, in the words of every refusal
_CHAIN = ("a graph of single-input layers joined by Add of two activations (residual connections, "
          "shortcuts with their own layers included)")

SUPPORTED_OPS = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Flatten", "Reshape",
                 "Conv", "BatchNormalization", "Identity", "Dropout", "Constant", "Shape", "MaxPool",
                 "AveragePool", "GlobalAveragePool")


@dataclass
class _Act:
    """A tensor computed from the network input: activation index in the IR and its ONNX shape."""

    index: int          # 0 = network input, i + 1 = output of layer i
    oshape: tuple       # full ONNX shape, batch axis included (batch size taken as 1)


def _ir_shape(oshape: tuple) -> tuple:
    per = tuple(int(d) for d in oshape[1:])
    return per if len(per) == 3 else (int(np.prod(per)),)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"node '{node.name or node.output[0]}' has op '{node.op_type}': {why}")


def _node_label(node) -> str:
    return f"node '{node.name or node.output[0]}' ({node.op_type})"


def _check_finite(node, what: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` unchanged, or ``InvalidInputError`` naming the node when it has NaN/inf entries."""
    require_finite(f"{_node_label(node)}: {what}", arr)
    return arr


class _Builder:
    def __init__(self, input_oshape: tuple):
        self.input_oshape = input_oshape
        self.input_shape = _ir_shape(input_oshape)
        self.layers: list = []
        self.names: list = []
        self.shapes = [self.input_shape]   # IR shape of each activation

    @property
    def last(self) -> int:
        return len(self.layers)

    def add(self, layer, name: str, shape: tuple) -> int:
        self.layers.append(layer)
        self.names.append(name)
        self.shapes.append(tuple(shape))
        return self.last

    def conform(self, act: _Act, oshape: tuple, node) -> int:
        """Make the IR shape of ``act`` agree with ``oshape`` (a reshape); returns the activation."""
        cur, want = self.shapes[act.index], _ir_shape(oshape)
        if int(np.prod(cur)) != int(np.prod(want)):
            raise InvalidInputError(f"node '{node.name}': cannot reshape {cur} to {want}")
        if cur == want:
            return act.index
        if len(want) == 1:
            return self.add(Flatten(), node.name or f"flatten_{self.last}", want)
        if act.index == 0 and self.last == 0:   # reshape of the raw input: just reinterpret the input
            self.input_shape = want
            self.shapes[0] = want
            return 0
        raise _unsupported(node, f"reshaping an activation of shape {cur} to {want} is not supported "
                                 "(only flattening, or reshaping the network input)")


def _as_const(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _load(path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InvalidInputError(f"ONNX file must exist; got {p!r} (not found)")
    try:
        model = onnx.load(p)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InvalidInputError(f"{p!r} must be a valid ONNX model; could not parse it ({exc})") from None
    if len(model.graph.node) == 0:
        raise InvalidInputError(f"{p!r} must be a valid ONNX model; got a graph without nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InvalidInputError(f"{p!r} must be a valid ONNX model; the checker says: {exc}") from None
    return model


def read_onnx(path) -> tuple[list, tuple, list]:
    """Read the ONNX file at ``path`` into ``(layers, input_shape, names)``, the arguments of
    :class:`~solvers.network.ir.Network` (use ``Network.from_onnx`` for the assembled network).

    Raises ``InvalidInputError`` for a missing or malformed file (or one with several inputs/outputs)
    and ``UnsupportedLayerError`` naming the first node the IR cannot express.
    """
    from onnx import numpy_helper

    model = _load(path)
    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise InvalidInputError(f"the ONNX graph must have exactly one (non-initializer) input; "
                                f"got {len(inputs)}: {[i.name for i in inputs]}")
    if len(g.output) != 1:
        raise InvalidInputError(f"the ONNX graph must have exactly one output; got {len(g.output)}")
    dims = inputs[0].type.tensor_type.shape.dim
    oshape = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            oshape.append(int(d.dim_value))
        elif k == 0:
            oshape.append(1)                      # symbolic batch axis
        else:
            raise InvalidInputError(f"the ONNX input must have a fixed shape apart from the batch axis; "
                                    f"got {[d.dim_param or d.dim_value for d in dims]}")
    if len(oshape) == 0:
        raise InvalidInputError("the ONNX input must have at least one axis; got a scalar")
    if len(oshape) == 1:                           # no batch axis: add one
        oshape = [1] + oshape
    oshape[0] = 1
    b = _Builder(tuple(oshape))
    acts: dict[str, _Act] = {inputs[0].name: _Act(0, tuple(oshape))}

    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    out_name = g.output[0].name
    consumers[out_name] = consumers.get(out_name, 0) + 1

    for node in g.node:
        op = node.op_type
        ins = [n for n in node.input]
        if op == "Constant":
            consts[node.output[0]] = _constant_value(node)
            continue
        if all((n == "" or n in consts) for n in ins):
            if op not in SUPPORTED_OPS and op not in _FOLDABLE:
                raise _unsupported(node, "only ReLU networks are supported "
                                         f"({', '.join(SUPPORTED_OPS)}); got a constant-only node")
            for name, val in zip(node.output, _eval_const(node, consts)):
                consts[name] = val
            continue
        if op not in SUPPORTED_OPS:
            raise _unsupported(node, f"only ReLU networks are supported ({', '.join(SUPPORTED_OPS)})")
        for n in ins:          # from here on, consumers[] counts the readers still to come
            if n:
                consumers[n] -= 1
        act_in = [acts.get(n) for n in ins]
        if op in ("Relu", "Identity", "Dropout", "Flatten", "Reshape", "Shape", "Gemm", "MatMul",
                  "Conv", "BatchNormalization", "Neg", "MaxPool", "AveragePool", "GlobalAveragePool") and \
                act_in[0] is None:
            raise _unsupported(node, "its first input must be computed from the network input")
        live = [k for k, a in enumerate(act_in) if a is not None]
        if len(live) == 1 and act_in[live[0]].index != b.last and op not in ("Shape", "Identity", "Dropout"):
            # a second path from an earlier activation (e.g. a downsampling shortcut)
            a = act_in[live[0]]
            act_in[live[0]] = _Act(b.add(Branch(a.index), f"branch_{b.last}", b.shapes[a.index]), a.oshape)
        if len(live) > 1 and op != "Add":
            raise _unsupported(node, f"combines {len(live)} activations; only {_CHAIN} is supported")
        out = node.output[0]
        if op in ("Identity", "Dropout"):
            acts[out] = act_in[0]
        elif op == "Relu":
            a = act_in[0]
            acts[out] = _Act(b.add(ReLU(), node.name or f"relu_{b.last}", b.shapes[a.index]), a.oshape)
        elif op == "Shape":
            consts[out] = np.array(act_in[0].oshape, dtype=np.int64)
        elif op == "Flatten":
            a = act_in[0]
            axis = int(_attrs(node).get("axis", 1))
            axis = axis + len(a.oshape) if axis < 0 else axis
            osh = (int(np.prod(a.oshape[:axis])), int(np.prod(a.oshape[axis:])))
            acts[out] = _Act(b.conform(a, osh, node), osh)
        elif op == "Reshape":
            acts[out] = _reshape(node, b, act_in[0], consts)
        elif op == "Gemm":
            acts[out] = _gemm(node, b, act_in, consts)
        elif op == "MatMul":
            acts[out] = _matmul(node, b, act_in, consts)
        elif op == "Conv":
            acts[out] = _conv(node, b, act_in, consts)
        elif op in ("MaxPool", "AveragePool", "GlobalAveragePool"):
            acts[out] = _pool(node, b, act_in[0])
        else:
            # later readers of the activation this node would fold into (aliases included)
            a0 = next(a for a in act_in if a is not None)
            uses = sum(consumers.get(n, 0) for n, a in acts.items() if a.index == a0.index)
            if op == "BatchNormalization":
                acts[out] = _batchnorm(node, b, act_in[0], consts, uses)
            else:
                acts[out] = _elementwise(node, b, act_in, consts, uses)
        if any(consumers.get(name, 0) for name in node.output[1:] if name):
            raise _unsupported(node, "its secondary outputs are used; only inference graphs are supported")

    if out_name not in acts:
        raise InvalidInputError(f"the ONNX output {out_name!r} must depend on the network input; it does not")
    final = acts[out_name]
    if final.index != b.last:
        b.add(Branch(final.index), "output", b.shapes[final.index])
    return b.layers, b.input_shape, b.names


# --------------------------------------------------------------------------------- node handlers
_FOLDABLE = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "ConstantOfShape", "Transpose",
             "Range", "Equal", "Where", "Expand", "ReduceProd", "Sqrt", "Reciprocal", "Pow")


def _constant_value(node) -> np.ndarray:
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(a.f if a.name == "value_float" else a.i)
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(a.floats) if a.name == "value_floats" else list(a.ints))
    raise _unsupported(node, "Constant without a supported value attribute")


def _eval_const(node, consts) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    feeds = {n: consts[n] for n in node.input if n}
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(node).run(None, feeds)]
    except Exception as exc:
        raise _unsupported(node, f"could not evaluate this constant expression ({exc})") from None


def _const_in(node, consts, k: int, what: str) -> np.ndarray:
    if k >= len(node.input) or node.input[k] == "":
        raise _unsupported(node, f"missing {what}")
    name = node.input[k]
    if name not in consts:
        raise _unsupported(node, f"its {what} ('{name}') must be a constant (initializer); got an activation")
    return _check_finite(node, f"its {what} ('{name}')", _as_const(consts[name]))


def _reshape(node, b: _Builder, a: _Act, consts) -> _Act:
    at = _attrs(node)
    target = [int(v) for v in (np.asarray(consts[node.input[1]]) if len(node.input) > 1 and node.input[1]
                               in consts else at.get("shape", []))]
    if len(node.input) > 1 and node.input[1] not in consts:
        raise _unsupported(node, "its target shape must be a constant")
    size = int(np.prod(a.oshape))
    shape = [a.oshape[k] if (v == 0 and not at.get("allowzero", 0)) else v for k, v in enumerate(target)]
    if shape.count(-1) > 1:
        raise InvalidInputError(f"node '{node.name}': reshape target {target} has more than one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if known == 0 or size % known:
            raise InvalidInputError(f"node '{node.name}': cannot reshape {a.oshape} to {target}")
        shape[shape.index(-1)] = size // known
    if int(np.prod(shape)) != size:
        raise InvalidInputError(f"node '{node.name}': cannot reshape {a.oshape} to {target}")
    if len(shape) == 1 or shape[0] != 1:       # the batch axis disappeared: keep one of size 1
        shape = [1] + shape
    osh = tuple(shape)
    return _Act(b.conform(a, osh, node), osh)


def _vector_act(node, b: _Builder, a: _Act) -> int:
    if len(b.shapes[a.index]) != 1 or int(np.prod(a.oshape[1:-1])) != 1:
        raise _unsupported(node, f"expects a (batch, features) input; got shape {a.oshape}")
    return b.shapes[a.index][0]


def _gemm(node, b: _Builder, act_in, consts) -> _Act:
    at = _attrs(node)
    a = act_in[0]
    if at.get("transA", 0):
        raise _unsupported(node, "transA=1 on the activation is not supported")
    if len(act_in) > 1 and act_in[1] is not None:
        raise _unsupported(node, "the second operand must be a constant weight")
    n_in = _vector_act(node, b, a)
    B = _const_in(node, consts, 1, "weight B")
    W = (B if at.get("transB", 0) else B.T) * float(at.get("alpha", 1.0))
    if W.ndim != 2 or W.shape[1] != n_in:
        raise InvalidInputError(f"node '{node.name}': weight must map {n_in} inputs; got shape {W.shape}")
    bias = np.zeros(W.shape[0])
    if len(node.input) > 2 and node.input[2]:
        C = _const_in(node, consts, 2, "bias C") * float(at.get("beta", 1.0))
        bias = np.broadcast_to(C, (1, W.shape[0])).reshape(-1).astype(np.float64)
    idx = b.add(Dense(W, bias), node.name or f"gemm_{b.last}", (W.shape[0],))
    return _Act(idx, (1, W.shape[0]))


def _matmul(node, b: _Builder, act_in, consts) -> _Act:
    a = act_in[0]
    if a is None or (len(act_in) > 1 and act_in[1] is not None):
        raise _unsupported(node, "only activation × constant matrix products are supported")
    n_in = _vector_act(node, b, a)
    W = _const_in(node, consts, 1, "weight")
    if W.ndim != 2 or W.shape[0] != n_in:
        raise InvalidInputError(f"node '{node.name}': weight must have {n_in} rows; got shape {W.shape}")
    idx = b.add(Dense(W.T.copy()), node.name or f"matmul_{b.last}", (W.shape[1],))
    return _Act(idx, tuple(a.oshape[:-1]) + (W.shape[1],))


def _conv(node, b: _Builder, act_in, consts) -> _Act:
    at = _attrs(node)
    a = act_in[0]
    W = _const_in(node, consts, 1, "weight")
    if W.ndim != 4:
        raise _unsupported(node, f"only 2-D convolutions are supported; got a weight of rank {W.ndim}")
    if int(at.get("group", 1)) != 1:
        raise _unsupported(node, f"group must be 1; got {at.get('group')}")
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise _unsupported(node, f"auto_pad={auto_pad} is not supported; export with explicit pads")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise _unsupported(node, f"pads must be symmetric [ph, pw, ph, pw]; got {pads}")
    bias = _const_in(node, consts, 2, "bias") if len(node.input) > 2 and node.input[2] else None
    if len(b.shapes[a.index]) != 3:
        raise _unsupported(node, f"expects a (C, H, W) input; got shape {b.shapes[a.index]}")
    conv = Conv2d(W, bias, stride=tuple(at.get("strides", [1, 1])), padding=(pads[0], pads[1]),
                  dilation=tuple(at.get("dilations", [1, 1])))
    shape = conv.output_shape(b.shapes[a.index])
    idx = b.add(conv, node.name or f"conv_{b.last}", shape)
    return _Act(idx, (1,) + tuple(shape))


def _pool(node, b: _Builder, a: _Act) -> _Act:
    """MaxPool / AveragePool (2-D, symmetric pads, floor mode or a ceil mode that changes nothing) and
    GlobalAveragePool."""
    shape = b.shapes[a.index]
    if len(shape) != 3:
        raise _unsupported(node, f"expects a (C, H, W) input; got shape {shape}")
    name = node.name or f"{node.op_type.lower()}_{b.last}"
    if node.op_type == "GlobalAveragePool":
        layer = AvgPool2d(kernel=shape[1:], stride=shape[1:])
        out = layer.output_shape(shape)
        return _Act(b.add(layer, name, out), (1,) + tuple(out))
    at = _attrs(node)
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise _unsupported(node, f"auto_pad={auto_pad} is not supported; export with explicit pads")
    kernel = list(at.get("kernel_shape", []))
    if len(kernel) != 2:
        raise _unsupported(node, f"only 2-D pooling is supported; got kernel_shape {kernel}")
    strides = list(at.get("strides", [1, 1]))
    pads = list(at.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise _unsupported(node, f"pads must be symmetric [ph, pw, ph, pw]; got {pads}")
    dil = list(at.get("dilations", [1, 1]))
    try:
        if node.op_type == "MaxPool":
            if int(at.get("storage_order", 0)) != 0:
                raise _unsupported(node, "storage_order=1 is not supported")
            layer = MaxPool2d(kernel, strides, (pads[0], pads[1]), dil)
        else:
            if dil != [1, 1]:
                raise _unsupported(node, f"dilations must be [1, 1] for AveragePool; got {dil}")
            layer = AvgPool2d(kernel, strides, (pads[0], pads[1]), bool(at.get("count_include_pad", 0)))
        out = layer.output_shape(shape)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{_node_label(node)}: {exc}") from None
    if int(at.get("ceil_mode", 0)):
        # ceil mode adds a last window only where floor mode leaves input uncovered
        for k, (n, kk, st, p, d) in enumerate(zip(shape[1:], kernel, strides, pads[:2], dil)):
            span = n + 2 * p - d * (kk - 1) - 1
            if span % st:
                raise _unsupported(node, "ceil_mode=1 changes the output shape here; export with ceil_mode=0")
    return _Act(b.add(layer, name, out), (1,) + tuple(out))


def _batchnorm(node, b: _Builder, a: _Act, consts, uses: int) -> _Act:
    at = _attrs(node)
    if at.get("training_mode", 0):
        raise _unsupported(node, "training_mode=1 is not supported; export the model in eval mode")
    scale, shift, mean, var = (_const_in(node, consts, k, w) for k, w in
                               ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
    s = scale / np.sqrt(var + float(at.get("epsilon", 1e-5)))
    t = shift - s * mean
    per = a.oshape[1:]
    # channel axis is ONNX axis 1 (= per-sample axis 0)
    cshape = (per[0],) + (1,) * (len(per) - 1)
    s_full = np.broadcast_to(s.reshape(cshape), per).reshape(b.shapes[a.index])
    t_full = np.broadcast_to(t.reshape(cshape), per).reshape(b.shapes[a.index])
    return _Act(_affine(node, b, a, s_full, t_full, uses), a.oshape)


def _elementwise(node, b: _Builder, act_in, consts, uses: int) -> _Act:
    op = node.op_type
    if op == "Neg":
        a = act_in[0]
        s = np.full(b.shapes[a.index], -1.0)
        return _Act(_affine(node, b, a, s, np.zeros_like(s), uses), a.oshape)
    x, y = act_in[0], act_in[1]
    if x is not None and y is not None:
        if op != "Add":
            raise _unsupported(node, "only Add of two activations (a residual connection) is supported")
        if x.oshape != y.oshape:
            raise _unsupported(node, f"residual Add needs equal shapes; got {x.oshape} and {y.oshape}")
        if b.last not in (x.index, y.index):   # both operands are earlier: continue from one of them
            x = _Act(b.add(Branch(x.index), f"branch_{b.last}", b.shapes[x.index]), x.oshape)
        cur, other = (x, y) if x.index == b.last else (y, x)
        return _Act(b.add(Add(source=other.index), node.name or f"add_{b.last}", b.shapes[cur.index]),
                    cur.oshape)
    a = x if x is not None else y
    if a.index != b.last:
        raise _unsupported(node, f"consumes an earlier activation (index {a.index}); only {_CHAIN} is supported")
    c = _const_in(node, consts, 1 if x is not None else 0, "constant operand")
    try:
        osh = np.broadcast_shapes(a.oshape, c.shape)
    except ValueError:
        raise InvalidInputError(f"node '{node.name}': constant of shape {c.shape} does not broadcast to "
                                f"{a.oshape}") from None
    if tuple(osh) != tuple(a.oshape):
        raise _unsupported(node, f"the constant (shape {c.shape}) would enlarge the activation {a.oshape}")
    full = np.broadcast_to(c, a.oshape)[0].reshape(b.shapes[a.index])
    one, zero = np.ones_like(full), np.zeros_like(full)
    if op == "Add":
        s, t = one, full
    elif op == "Sub":
        s, t = (one, -full) if x is not None else (-one, full)
    elif op == "Mul":
        s, t = full, zero
    else:  # Div
        if y is not None:
            raise _unsupported(node, "division by an activation is not piecewise linear")
        if np.any(full == 0):
            raise InvalidInputError(f"node '{node.name}': division by a constant with zero entries")
        s, t = 1.0 / full, zero
    return _Act(_affine(node, b, a, s, t, uses), a.oshape)


def _affine(node, b: _Builder, a: _Act, s: np.ndarray, t: np.ndarray, uses: int) -> int:
    """Apply ``x ↦ s ⊙ x + t`` (s, t in the activation's IR shape): fold it into the layer that
    produced ``a`` when that layer is affine and nothing later reads its output (``uses == 0``),
    else add a layer."""
    # s, t come from the node's constants (already checked) but also from arithmetic on them, e.g.
    # BatchNorm's scale / sqrt(var + eps) or Div's 1 / c
    _check_finite(node, "its scale", s)
    _check_finite(node, "its shift", t)
    shape = b.shapes[a.index]
    sole = a.index == b.last and a.index > 0 and uses == 0
    prev = b.layers[-1] if sole else None
    if isinstance(prev, Dense):
        prev.weight = prev.weight * s[:, None]
        prev.bias = prev.bias * s + t
        return _folded(node, b)
    if isinstance(prev, Conv2d):
        sc = s.reshape(s.shape[0], -1)
        tc = t.reshape(t.shape[0], -1)
        if np.all(sc == sc[:, :1]) and np.all(tc == tc[:, :1]):
            prev.weight = prev.weight * sc[:, 0][:, None, None, None]
            prev.bias = prev.bias * sc[:, 0] + tc[:, 0]
            return _folded(node, b)
    if isinstance(prev, Normalize):
        scale = np.broadcast_to(1.0 / prev.std, shape)
        shift = np.broadcast_to(-prev.mean / prev.std, shape)
        new_scale, new_shift = s * scale, s * shift + t
        if np.all(new_scale != 0):
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                mean, std = -new_shift / new_scale, 1.0 / new_scale
            b.layers[-1] = Normalize(_check_finite(node, "the folded input normalization mean", mean),
                                     _check_finite(node, "the folded input normalization std", std))
            return a.index
    if np.all(s != 0):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            mean, std = -t / s, 1.0 / s
        return b.add(Normalize(_check_finite(node, "its normalization mean", mean),
                               _check_finite(node, "its normalization std", std)),
                     node.name or f"scale_{b.last}", shape)
    if len(shape) == 1:
        return b.add(Dense(np.diag(s), t), node.name or f"scale_{b.last}", shape)
    raise _unsupported(node, "multiplication by a constant with zero entries on an image tensor")


def _folded(node, b: _Builder) -> int:
    """After ``node`` was folded into the last layer: check the products, naming the node."""
    check_folded(b.layers, b.names, _node_label(node))
    return b.last
