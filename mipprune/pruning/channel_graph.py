"""Channel dependency graph: channel groups through residual adds, concats, gates, depthwise and
grouped convolutions and channel shuffles, found on a ``torch.fx`` trace with shape propagation.

Every tensor of the trace gets a *channel map*: for each of its channels, the *space* it comes from
and its index there. Spaces are created by producers (an ``nn.Conv2d`` with ``groups=1`` or an
``nn.Linear`` creates one of its output size), by the network input and by ops the analysis cannot
map. Ops then carry the maps:

- pass-through (activations — a stateless module called several times included —, dropout,
  pooling, spatial means, BatchNorm, depthwise and grouped convolutions, ``contiguous``/``clone``):
  the map is unchanged (BatchNorm and grouped convs are sliced along);
- index maps: ``flatten`` (each channel owns ``H·W`` consecutive features), ``cat`` on the channel
  dim (maps concatenated), channel shuffle (``view(N, g, C/g, H, W) → transpose(1, 2) → view``);
- elementwise ``add``/``sub``/``mul``/``div`` (residual adds, squeeze-excitation gates): the spaces
  of the operands are *merged* channel by channel, so that every producer writing the result and
  every consumer reading it share one kept set;
- consumers (``nn.Conv2d`` ``groups=1`` / ``nn.Linear``) lose the input columns of removed channels
  and are reconstructed.

*Channels last.* A Linear on the last axis of an N-D tensor (N ≥ 3, e.g. the MLP of a ConvNeXt
block after its permute, of a ViT or Swin block on (N, T, D) / (N, H, W, C)) creates a space on the
last axis; activations, dropout, elementwise ops between channels-last operands and reshapes that
keep the last axis carry it, and a Linear reading it is its consumer, so the hidden units of
``Linear → GELU [→ Dropout] → Linear`` form a group. Last-axis and dim-1 maps are never mixed: a
permute, a LayerNorm, pooling, a concat or conv on such a tensor is an op the analysis cannot map.

A grouped convolution (``groups = g``) removes whole convolution groups: the space's channels are
cut in *units* of ``C/g`` consecutive channels (1 for depthwise). A *channel group* is one merged
space: its units are selected together in all its members. A space reaching the network input or
output, one read by an op the analysis cannot map (``chunk``/``split`` — pruning would move their
boundaries —, a module called twice with weights, an unknown module or function, a 3-D tensor …)
stays whole, and the group records why.

Models that ``torch.fx.symbolic_trace`` cannot trace (data-dependent control flow) raise
:class:`~solvers.errors.UnsupportedLayerError` with fx's message, the module being traced when it
failed and the line of its forward (:func:`mipprune.pruning.graph.trace_blocker`); ``torch.export`` graphs are not read
(their ATen ops on lifted parameters have no modules to slice).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mipprune.pruning.graph import _is_shape_value, fx_trace
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["ChannelGraph", "ChannelGroup", "Member", "build_channel_graph"]


# --------------------------------------------------------------------------- public records
@dataclass(frozen=True)
class Member:
    """One module's share of a channel group.

    Attributes
    ----------
    module : str
        Qualified module name.
    role : "producer" | "batchnorm" | "grouped" | "consumer"
        Producer: output channels (weight rows, bias) removed. BatchNorm: sliced. Grouped: a
        depthwise/grouped conv sliced on both sides (whole convolution groups). Consumer: input
        columns removed, weights reconstructed.
    units : int array (C,)
        For each channel of the sliced dimension (output channels of a producer, input channels of
        a consumer, features of a BatchNorm, input = output channels of a grouped conv), the unit
        of this group it belongs to, or −1 if it belongs to another group.
    columns_per_channel : int
        Consumers: columns of the bridge layout per input channel (``kh·kw`` for a conv, ``H·W``
        for a Linear after a flattened map, 1 otherwise); 1 for the other roles.
    """

    module: str
    role: str
    units: np.ndarray
    columns_per_channel: int = 1

    def column_units(self) -> np.ndarray:
        """Consumers: the unit of each input column in the bridge layout (−1: another group's)."""
        return np.repeat(self.units, self.columns_per_channel)


# The dimensions of a module a member's units index: "out" (producer rows, BatchNorm features, grouped
# conv outputs) and/or "in" (consumer input channels, grouped conv inputs).
MEMBER_SIDES = {"producer": ("out",), "batchnorm": ("out",), "grouped": ("in", "out"), "consumer": ("in",)}


@dataclass
class ChannelGroup:
    """Channels removed together, in units.

    Attributes
    ----------
    id : int
    n_units : int
        Selectable units (= channels unless a grouped conv makes a unit several channels).
    unit_size : int
        Channels per unit.
    members : list of Member
    fixed : list of str
        Why the group must stay whole (empty: prunable).
    """

    id: int
    n_units: int
    unit_size: int
    members: list[Member] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """No reason to keep it whole, it has a consumer to reconstruct and more than one unit."""
        return not self.fixed and self.n_units > 1 and bool(self.consumers)

    def _role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    @property
    def producers(self) -> list[Member]:
        return self._role("producer")

    @property
    def consumers(self) -> list[Member]:
        return self._role("consumer")

    @property
    def name(self) -> str:
        """A readable name: the producers' names (``'+'``-joined), else ``group<id>``."""
        names = [m.module for m in self.producers]
        return "+".join(names) if names else f"group{self.id}"

    def describe(self) -> str:
        """One line: units, producers, pass-through, consumers, and why it is fixed."""
        roles = {r: [m.module for m in self._role(r)] for r in ("producer", "batchnorm", "grouped", "consumer")}
        unit = f" (units of {self.unit_size} channels)" if self.unit_size > 1 else ""
        s = (f"{self.n_units} units{unit}; producers {roles['producer']}, batchnorms {roles['batchnorm']}, "
             f"grouped {roles['grouped']}, consumers {roles['consumer']}")
        return s + (f"; fixed: {'; '.join(self.fixed)}" if self.fixed else "")


@dataclass
class ChannelGraph:
    """What :func:`build_channel_graph` finds.

    Attributes
    ----------
    groups : list of ChannelGroup
        Every group, prunable or not, in the forward order of their first producer.
    layers : list of str
        ``nn.Conv2d`` / ``nn.Linear`` modules the forward calls, forward order.
    """

    groups: list[ChannelGroup]
    layers: list[str]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def blocked(self) -> dict[str, list[str]]:
        """For each Conv2d/Linear that belongs to no prunable group: why (one line per group of it)."""
        out: dict[str, list[str]] = {}
        free = {m.module for g in self.prunable for m in g.members}
        for g in self.groups:
            if g.prunable:
                continue
            why = "; ".join(g.fixed) if g.fixed else (
                "a single unit" if g.n_units <= 1 else "no consumer reads it")
            for m in g.members:
                if m.module in self.layers and m.module not in free:
                    out.setdefault(m.module, [])
                    if why not in out[m.module]:
                        out[m.module].append(why)
        return out

    def require_prunable(self) -> list[ChannelGroup]:
        """The prunable groups, or :class:`~solvers.errors.UnsupportedLayerError` naming, for every
        layer, the ops that blocked it."""
        groups = self.prunable
        if not groups:
            lines = [f"{layer}: {' | '.join(why)}" for layer, why in self.blocked().items()]
            raise UnsupportedLayerError("model must have at least one prunable channel group; got none. "
                                        "Blocked: " + ("; ".join(lines) if lines else "no Conv2d/Linear layers"))
        return groups

    def kept_channels(self, masks: Mapping[int, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
        """Kept channels per (module, side) (:data:`MEMBER_SIDES`) from per-group unit masks
        ({group id: bool (n_units,)}, not checked here); groups not in ``masks`` keep everything."""
        by_id = {g.id: g for g in self.groups}
        keeps: dict[tuple[str, str], np.ndarray] = {}
        for gid, mask in masks.items():
            mask = np.asarray(mask, dtype=bool)
            for m in by_id[gid].members:
                for side in MEMBER_SIDES[m.role]:
                    keep = keeps.setdefault((m.module, side), np.ones(m.units.size, dtype=bool))
                    mine = m.units >= 0
                    keep[mine] &= mask[m.units[mine]]
        return keeps

    def after_pruning(self, masks: Mapping[int, np.ndarray]) -> "ChannelGraph":
        """The graph of the model these ``masks`` ({group id: kept units}) prune, without tracing it
        again: every member's channels are sliced like the module it names (so another group's
        member on a shared dimension — a concat reader — loses the removed positions too) and the
        pruned groups' kept units are renumbered 0 … k − 1. Group ids, names, order, reasons and
        layers carry over; equal to :func:`build_channel_graph` on the pruned model (tested), at no
        forward pass (a retrace per group cost ResNet-50's sequential driver minutes at 224²)."""
        keeps = self.kept_channels(masks)
        groups = []
        for g in self.groups:
            mask = None if g.id not in masks else np.asarray(masks[g.id], dtype=bool)
            renumber = None if mask is None else np.cumsum(mask) - 1
            members = []
            for m in g.members:
                keep = keeps.get((m.module, MEMBER_SIDES[m.role][0]))
                units = m.units if keep is None else m.units[keep]
                if renumber is not None:
                    units = np.where(units >= 0, renumber[np.maximum(units, 0)], -1).astype(np.int64)
                members.append(replace(m, units=units))
            groups.append(replace(g, n_units=g.n_units if mask is None else int(mask.sum()), members=members,
                                  fixed=list(g.fixed)))
        return ChannelGraph(groups=groups, layers=list(self.layers))

    def group_of(self, module: str, role: str | None = None) -> list[ChannelGroup]:
        """Groups that ``module`` belongs to (optionally in ``role``)."""
        return [g for g in self.groups if any(m.module == module and (role is None or m.role == role)
                                              for m in g.members)]


# --------------------------------------------------------------------------- op tables
_STATELESS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
# wrapped leaf functions of other libraries, channel-wise (per-sample drop in training, identity in eval)
_PASS_FUNCTION_NAMES = {"stochastic_depth", "drop_path"}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE = {"view", "reshape", "flatten"}


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}() ({node.name})"
    return f"function {getattr(node.target, '__name__', node.target)} ({node.name})"


# --------------------------------------------------------------------------- channel maps
@dataclass
class _Map:
    """Channels of a tensor: ``space[c]``, ``index[c]`` (raw space ids, resolved at the end);
    ``cols``: consecutive features per channel along dim 1 once flattened (1 for (N, C, …)); the
    ``shuffle`` maps of a 5-D channel-shuffle intermediate are 2-D."""

    space: np.ndarray
    index: np.ndarray
    cols: int = 1
    flat: bool = False
    # channels on the LAST axis of an N-D tensor (N >= 3): a Linear's output on (N, …, features);
    # only elementwise ops, reshapes that keep the last axis and Linear consumers read such a map
    last: bool = False


class _Spaces:
    """Union-find over spaces with size, unit size and reasons to stay whole."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.unit: list[int] = []
        self.fixed: list[list[str]] = []
        self.order: list[int] = []

    def new(self, size: int, fixed: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.unit.append(1)
        self.fixed.append([fixed] if fixed else [])
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def fix(self, i: int, reason: str) -> None:
        r = self.find(i)
        if reason not in self.fixed[r]:
            self.fixed[r].append(reason)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.unit[a] = math.lcm(self.unit[a], self.unit[b])
        self.fixed[a] += [r for r in self.fixed[b] if r not in self.fixed[a]]


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = _Spaces()
        self.maps: dict[torch.fx.Node, _Map] = {}
        self.records: list[tuple[str, str, _Map, int]] = []  # (module, role, map, cols)
        self.calls: dict[str, int] = {}
        self.layers: list[str] = []
        self.pieces: set[torch.fx.Node] = set()
        self.first_call: dict[str, int] = {}  # module → position of its first call (forward order)
        for i, node in enumerate(gm.graph.nodes):
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
                self.first_call.setdefault(node.target, i)

    # ---------------------------------------------------------------- helpers
    def fresh(self, node: torch.fx.Node, reason: str | None = None, size: int | None = None,
              last: bool = False) -> None:
        """A new space for ``node``'s output (fixed if ``reason``); on the last axis if ``last``."""
        shape = _shape(node)
        if size is None:
            if shape is None or len(shape) < 2:
                return
            size = shape[-1] if last else shape[1]
        s = self.spaces.new(size, reason)
        self.maps[node] = _Map(np.full(size, s), np.arange(size), last=last)

    def fix_map(self, m: _Map | None, reason: str) -> None:
        if m is None:
            return
        for s in np.unique(m.space):
            self.spaces.fix(int(s), reason)

    def data_inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if not _is_shape_value(a)]

    def unknown(self, node: torch.fx.Node, why: str) -> None:
        """An op we cannot map: its inputs' spaces and its output stay whole."""
        reason = f"{why}: {_op_name(node)}"
        for a in self.data_inputs(node):
            self.fix_map(self.maps.get(a), reason)
        self.fresh(node, reason)

    def merge(self, a: _Map, b: _Map, what: str) -> bool:
        """Tie channel ``c`` of ``a`` to channel ``c`` of ``b``: merges whole spaces when the indices
        agree; otherwise fixes both and returns False."""
        ok = a.space.size == b.space.size
        pairs: list[tuple[int, int]] = []
        if ok:
            ra, rb = self.roots(a.space.reshape(-1)), self.roots(b.space.reshape(-1))
            ia, ib = a.index.reshape(-1), b.index.reshape(-1)
            for x, y in set(zip(ra.tolist(), rb.tolist())):
                sel = (ra == x) & (rb == y)
                i, j = ia[sel], ib[sel]
                if not (np.array_equal(i, j) and self.spaces.size[x] == self.spaces.size[y]
                        and np.unique(i).size == self.spaces.size[x]):
                    ok = False
                pairs.append((x, y))
        if not ok:
            self.fix_map(a, f"{what} ties channels that do not align")
            self.fix_map(b, f"{what} ties channels that do not align")
            return False
        for x, y in pairs:
            self.spaces.union(x, y)
        return True

    def roots(self, space: np.ndarray) -> np.ndarray:
        """Current union-find roots of an array of space ids."""
        uniq, inv = np.unique(space, return_inverse=True)
        return np.array([self.spaces.find(int(s)) for s in uniq], dtype=np.int64)[inv].reshape(space.shape)

    def record(self, module: str, role: str, m: _Map, cols: int = 1) -> None:
        self.records.append((module, role, m, cols))

    # ---------------------------------------------------------------- ops
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fresh(node, "reads the network input")
            elif node.op == "output":
                for a in node.all_input_nodes:
                    self.fix_map(self.maps.get(a), "is the network output")
            elif node.op == "get_attr":
                self.fresh(node, f"a constant tensor: {node.target!r}")
            elif node.op == "call_module":
                self.module(node)
            elif node.op in ("call_function", "call_method"):
                if _is_shape_value(node):
                    continue
                self.function(node)

    def source(self, node: torch.fx.Node) -> tuple[torch.fx.Node | None, _Map | None]:
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        return first, (self.maps.get(first) if first is not None else None)

    def module(self, node: torch.fx.Node) -> None:
        name, mod = node.target, self.modules[node.target]
        first, m = self.source(node)
        in_shape, out_shape = _shape(first), _shape(node)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if name not in self.layers:
                self.layers.append(name)
        others = [a for a in self.data_inputs(node) if a is not first]
        if others:
            return self.unknown(node, "reads several tensors")
        if isinstance(mod, _STATELESS):
            if m is not None and m.last and isinstance(mod, _POOL_MODULES):
                return self.unknown(node, "pooling over a channels-last tensor")
            return self.pass_through(node, m, in_shape, out_shape)
        calls = self.calls[name]
        if calls > 1:
            return self.unknown(node, f"a module with weights called {calls} times")
        if isinstance(mod, nn.Conv2d):
            if m is None or m.flat or m.last or in_shape is None or len(in_shape) != 4:
                return self.unknown(node, "a convolution on an unmapped tensor")
            if mod.groups == 1:
                self.record(name, "consumer", m, mod.kernel_size[0] * mod.kernel_size[1])
                self.fresh(node)
                self.record(name, "producer", self.maps[node])
                return
            g = mod.groups
            u_in, u_out = mod.in_channels // g, mod.out_channels // g
            if u_in != u_out:
                return self.unknown(node, f"a grouped convolution with {u_in} inputs and {u_out} outputs per group")
            # each conv group must be u consecutive channels of one space, aligned to u
            blocks_ok = all(len(set(m.space[b * u_in:(b + 1) * u_in])) == 1
                            and m.index[b * u_in] % u_in == 0
                            and np.array_equal(m.index[b * u_in:(b + 1) * u_in],
                                               m.index[b * u_in] + np.arange(u_in)) for b in range(g))
            if not blocks_ok:
                return self.unknown(node, "a grouped convolution whose groups do not align with channel sources")
            for s in np.unique(m.space):
                r = self.spaces.find(int(s))
                self.spaces.unit[r] = math.lcm(self.spaces.unit[r], u_in)
            self.record(name, "grouped", m)
            self.maps[node] = m
            return
        if isinstance(mod, nn.Linear) and in_shape is not None and len(in_shape) >= 3:
            return self.linear_last(node, name, mod, m)
        if isinstance(mod, nn.Linear):
            if m is None or in_shape is None or len(in_shape) != 2:
                return self.unknown(node, "a Linear on a tensor that is not (N, features)")
            if m.space.size * m.cols != mod.in_features:
                return self.unknown(node, "a Linear whose features do not match the channel map")
            self.record(name, "consumer", m, m.cols)
            self.fresh(node, size=mod.out_features)
            self.record(name, "producer", self.maps[node])
            return
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m is None or m.cols != 1 or m.last or in_shape is None or len(in_shape) not in (2, 4) or \
                    mod.num_features != m.space.size:
                return self.unknown(node, "a BatchNorm over an unmapped dimension")
            self.record(name, "batchnorm", m)
            self.maps[node] = m
            return
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, m, in_shape, out_shape)
        return self.unknown(node, f"an unmapped module {type(mod).__name__}")

    def linear_last(self, node, name: str, mod: nn.Linear, m: _Map | None) -> None:
        """A Linear on the last axis of an N-D tensor (N >= 3): a producer of a last-axis space of
        ``out_features``; a consumer when its input's map is on the last axis too. Reading a map on
        another axis (dim 1, after a permute, a LayerNorm, …), that map stays whole."""
        if m is not None and m.last and m.space.ndim == 1 and m.cols == 1 and m.space.size == mod.in_features:
            self.record(name, "consumer", m, 1)
        else:
            self.fix_map(m, f"read on another axis than its channels by the Linear {name!r}")
        self.fresh(node, size=mod.out_features, last=True)
        self.record(name, "producer", self.maps[node])

    def pass_through(self, node, m, in_shape, out_shape) -> None:
        """An op that keeps the channels (activation, pooling, dropout): the map goes through."""
        axis = slice(-1, None) if m is not None and m.last else slice(0, 2)
        if m is not None and in_shape is not None and out_shape is not None and \
                (len(in_shape) != len(out_shape) or in_shape[axis] != out_shape[axis]):
            return self.unknown(node, "changes the channel dimension")
        if m is not None:
            self.maps[node] = m

    def flatten(self, node, m, in_shape, out_shape) -> None:
        if m is None or in_shape is None or out_shape is None:
            return self.unknown(node, "a reshape of an unmapped tensor")
        if in_shape == out_shape:
            self.maps[node] = m
            return
        if m.last:  # a reshape of the leading axes keeps a last-axis map (on 2-D, the last axis is dim 1)
            if len(out_shape) >= 2 and out_shape[-1] == in_shape[-1] and m.space.ndim == 1:
                self.maps[node] = _Map(m.space, m.index, last=len(out_shape) >= 3)
                return
            return self.unknown(node, f"a reshape {in_shape} → {out_shape} of a channels-last tensor")
        if len(in_shape) == 4 and not m.flat and m.cols == 1 and len(out_shape) == 2 and \
                out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
            self.maps[node] = _Map(m.space, m.index, cols=in_shape[2] * in_shape[3])
            return
        return self.unknown(node, f"a reshape {in_shape} → {out_shape}")

    def function(self, node: torch.fx.Node) -> None:
        target = node.target
        first, m = self.source(node)
        in_shape, out_shape = _shape(first), _shape(node)
        others = [a for a in self.data_inputs(node) if a is not first]
        is_method = node.op == "call_method"
        if (not is_method and (target in _PASS_FUNCTIONS or getattr(target, "__name__", None) in _PASS_FUNCTION_NAMES)) \
                or (is_method and target in _PASS_METHODS):
            if others:
                return self.unknown(node, "reads several tensors")
            if node.kwargs.get("return_indices", False):
                return self.unknown(node, "pooling with indices")
            if m is not None and m.last and target in _POOL_FUNCTIONS:
                return self.unknown(node, "pooling over a channels-last tensor")
            return self.pass_through(node, m, in_shape, out_shape)
        if (not is_method and target in _ELEMENTWISE) or (is_method and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node)
        if (not is_method and target is torch.cat) or (is_method and target == "cat"):
            return self.cat(node)
        if (not is_method and target is torch.flatten) or (is_method and target in _RESHAPE):
            if others:
                return self.unknown(node, "reads several tensors")
            return self.reshape(node, m, in_shape, out_shape)
        if (not is_method and target is torch.transpose) or (is_method and target == "transpose"):
            dims = tuple(sorted(int(d) for d in node.args[1:3])) if len(node.args) >= 3 else None
            if m is not None and m.space.ndim == 2 and dims == (1, 2):
                self.maps[node] = _Map(m.space.T.copy(), m.index.T.copy())
                return
            return self.unknown(node, "a transpose that is not a channel shuffle")
        if (not is_method and target in (torch.chunk, torch.split, torch.tensor_split)) or \
                (is_method and target in ("chunk", "split", "tensor_split", "unbind")):
            self.pieces.add(node)
            return self.unknown(node, "a chunk/split (pruning would move its boundaries)")
        if not is_method and target is operator.getitem and first in self.pieces:
            self.fresh(node, f"a piece of {_op_name(first)}")
            return
        if (not is_method and target is torch.mean) or (is_method and target == "mean"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if m is not None and dims and in_shape is not None and len(in_shape) == 4 and not m.flat and not m.last \
                    and all(d % 4 in (2, 3) for d in dims) and out_shape is not None and out_shape[1] == in_shape[1]:
                self.maps[node] = m
                return
            return self.unknown(node, "a mean over the channel dimension")
        return self.unknown(node, "an unmapped op")

    def reshape(self, node, m, in_shape, out_shape) -> None:
        if m is None or in_shape is None or out_shape is None:
            return self.unknown(node, "a reshape of an unmapped tensor")
        if m.last:
            return self.flatten(node, m, in_shape, out_shape)
        # channel shuffle, step 1: (N, C, H, W) → (N, g, C/g, H, W)
        if len(in_shape) == 4 and len(out_shape) == 5 and m.space.ndim == 1 and m.cols == 1 and \
                out_shape[0] == in_shape[0] and out_shape[1] * out_shape[2] == in_shape[1] and \
                out_shape[3:] == in_shape[2:]:
            g = out_shape[1]
            self.maps[node] = _Map(m.space.reshape(g, -1), m.index.reshape(g, -1))
            return
        # channel shuffle, step 3: (N, C/g, g, H, W) → (N, C, H, W); pruning must keep the same
        # position j in every one of the g source rows, so the rows are tied together
        if len(in_shape) == 5 and len(out_shape) == 4 and m.space.ndim == 2 and \
                out_shape[1] == in_shape[1] * in_shape[2] and out_shape[2:] == in_shape[3:]:
            rows = [_Map(m.space[:, i], m.index[:, i]) for i in range(m.space.shape[1])]
            ok = all(self.merge(rows[0], r, f"channel shuffle {_op_name(node)}") for r in rows[1:])
            if not ok:
                self.fix_map(m, f"channel shuffle whose rows do not align: {_op_name(node)}")
            self.maps[node] = _Map(m.space.reshape(-1), m.index.reshape(-1))
            return
        if m.space.ndim == 1:
            return self.flatten(node, m, in_shape, out_shape)
        return self.unknown(node, f"a reshape {in_shape} → {out_shape}")

    def elementwise(self, node: torch.fx.Node) -> None:
        out_shape = _shape(node)
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node) and not _is_shape_value(a)]
        if out_shape is None or len(out_shape) < 2:
            return self.unknown(node, "an elementwise op on an unmapped tensor")
        if any(a in self.maps and self.maps[a].last for a in tensors):
            return self.elementwise_last(node, tensors, out_shape)
        mapped = []
        for a in tensors:
            s = _shape(a)
            axis = None if s is None else len(s) - len(out_shape) + 1  # broadcasting aligns from the right
            if axis is None or axis < 0 or s[axis] == 1 and out_shape[1] != 1:
                continue  # a scalar, or broadcast along channels: couples no channel
            # a lower-rank operand spanning the channels (a (C, 1, 1) layer scale) has no map: it stays whole
            if len(s) != len(out_shape) or s[1] != out_shape[1] or a not in self.maps or self.maps[a].space.ndim != 1:
                return self.unknown(node, "an elementwise op whose operands do not share a channel map")
            mapped.append(self.maps[a])
        if not mapped:
            return self.unknown(node, "an elementwise op on an unmapped tensor")
        if any(x.cols != mapped[0].cols for x in mapped):
            return self.unknown(node, "an elementwise op over differently flattened tensors")
        for other in mapped[1:]:
            self.merge(mapped[0], other, f"the elementwise {_op_name(node)}")
        self.maps[node] = mapped[0]

    def elementwise_last(self, node: torch.fx.Node, tensors: list, out_shape: tuple[int, ...]) -> None:
        """An elementwise op with a channels-last operand: every operand spanning the last axis must
        be channels-last (merged); a size-1 last axis broadcasts and couples nothing."""
        mapped = []
        for a in tensors:
            s = _shape(a)
            if s is None or len(s) == 0 or s[-1] == 1 and out_shape[-1] != 1:
                continue
            x = self.maps.get(a)
            if x is None or not x.last or len(s) != len(out_shape) or s[-1] != out_shape[-1]:
                return self.unknown(node, "an elementwise op mixing a channels-last tensor with another layout")
            mapped.append(x)
        if not mapped:
            return self.unknown(node, "an elementwise op broadcasting a channels-last tensor")
        for other in mapped[1:]:
            self.merge(mapped[0], other, f"the elementwise {_op_name(node)}")
        self.maps[node] = mapped[0]

    def cat(self, node: torch.fx.Node) -> None:
        seq = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = _shape(node)
        if not isinstance(seq, (list, tuple)) or out_shape is None:
            return self.unknown(node, "a concat of unmapped tensors")
        if dim < 0:
            dim += len(out_shape)
        maps = [self.maps.get(a) if isinstance(a, torch.fx.Node) else None for a in seq]
        if dim != 1:
            return self.unknown(node, f"a concat along dim {dim}")
        if any(x is None or x.space.ndim != 1 or x.last for x in maps) or len({x.cols for x in maps}) != 1:
            return self.unknown(node, "a concat of unmapped tensors")
        self.maps[node] = _Map(np.concatenate([x.space for x in maps]), np.concatenate([x.index for x in maps]),
                               cols=maps[0].cols)

    # ---------------------------------------------------------------- result
    def groups(self) -> list[ChannelGroup]:
        sp = self.spaces
        roots: dict[int, ChannelGroup] = {}

        def group(root: int) -> ChannelGroup:
            if root not in roots:
                unit = sp.unit[root]
                fixed = list(sp.fixed[root])
                if sp.size[root] % unit:
                    fixed.append(f"grouped convolutions need units of {unit} channels, which do not divide "
                                 f"{sp.size[root]}")
                    unit = 1
                roots[root] = ChannelGroup(id=len(roots), n_units=sp.size[root] // unit, unit_size=unit,
                                           fixed=fixed)
            return roots[root]

        ordered: list[tuple[str, str, _Map, int]] = sorted(
            self.records, key=lambda r: (self.first_call.get(r[0], 0), r[1] != "producer"))
        for module, role, m, cols in ordered:
            flat_space = self.roots(m.space)
            for root in dict.fromkeys(flat_space.tolist()):
                g = group(root)
                units = np.where(flat_space == root, m.index // g.unit_size, -1).astype(np.int64)
                g.members.append(Member(module=module, role=role, units=units, columns_per_channel=cols))
        return sorted(roots.values(), key=lambda g: g.id)


def _trace(model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidInputError(f"example_input must be a tensor batch; got {type(example_input).__name__}")
    gm = fx_trace(model)
    x = prepare_input(model, example_input)
    with evaluation_mode(model):
        try:
            model(x)
        except Exception as exc:
            raise InvalidInputError(
                f"example_input must run through the model; got {type(exc).__name__}: {exc}") from exc
    with evaluation_mode(gm):
        try:
            ShapeProp(gm).propagate(x)
        except Exception as exc:
            raise InvalidInputError(
                f"example_input must run through the traced model; got {type(exc).__name__}: {exc}") from exc
    return gm


def build_channel_graph(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """The channel groups of ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Traced with ``torch.fx.symbolic_trace`` and run once in eval mode under ``no_grad`` (modes,
        weights and running statistics are left as they were).
    example_input : tensor
        A batch the model accepts, e.g. ``(1, 3, 32, 32)``: shapes are propagated through the trace.

    Returns
    -------
    ChannelGraph
        Every group (``.prunable`` for those that can be cut) and the forward order of the layers.

    Raises
    ------
    UnsupportedLayerError
        If fx cannot trace the model (the message is fx's).
    InvalidInputError
        If ``example_input`` does not run through the model.
    """
    gm = _trace(model, example_input)
    analysis = _Analysis(gm)
    analysis.run()
    return ChannelGraph(groups=analysis.groups(), layers=analysis.layers)
