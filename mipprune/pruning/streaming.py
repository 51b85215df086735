"""Truncated, cached forwards over an fx trace: calibration passes that run only what a capture needs.

Sequential group pruning (He et al.) captures, for every group, the inputs of its consumers on the
model pruned so far and their targets on the dense model. One full forward of each model per group
dominated large runs (ResNet-50 at 224², 512 images: ~37 groups, ~50 s a pass on 2 cores). Here:

* a *cut* is a node of the model's ``torch.fx`` trace after which exactly one value is live: every
  later node needs only that tensor (the input, a ResNet block's output, …);
* :class:`CachedForward` keeps the activation at one cut for every calibration batch (on the model's
  device, in its dtype) and runs a batch from there only up to the last node a capture needs
  (submodules are called as modules, so the capture's forward hooks fire), never to the output;
* the cache stays valid while every module changed since it was computed lies after the cut:
  :meth:`CachedForward.advance` moves it forward (computing the new cut from the old one) and
  :meth:`CachedForward.rebind` carries it over to a rebuilt (pruned) model whose trace has the same
  nodes (else it is dropped and batches run from the input again, still truncated);
* :func:`record_target_rows` keeps, in one forward of the dense model, each layer's output rows at
  exactly the positions a later :func:`~mipprune.pruning.bridge.capture` of that layer samples
  (the same per-layer generator over the same batches), so the dense targets ``Y`` of every group
  cost one pass in all instead of a second full forward per group.

The data must yield the same batches in the same order on every pass (a cache is per batch index):
:meth:`CachedForward.create` checks this by iterating it twice and comparing checksums, and every
later pass checks each batch again.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from mipprune.pruning.bridge import _batch_input, layer_generator, sample_positions
from mipprune.pruning.graph import fx_trace
from mipprune.torch_utils import evaluation_mode, prepare_input
from solvers.errors import InvalidInputError, MipPruneError

__all__ = ["CachedForward", "record_target_rows", "target_rows_bytes"]


class _StopBefore(Exception):
    """Raised by a forward pre-hook to end a truncated forward before the module runs."""


def _fingerprint(x: torch.Tensor) -> tuple:
    """Shape and float64 sum of a batch: what tells two passes over the data apart."""
    return tuple(x.shape), float(torch.sum(x.detach(), dtype=torch.float64))


class CachedForward:
    """Forwards of ``model`` over a fixed sequence of calibration batches, from the activation cached
    at a cut of its fx trace (or from the input) up to a given node.

    Attributes
    ----------
    cut : int
        Index (in the trace's node list) of the node whose value is cached; 0 (the input
        placeholder) means no cache: batches run from their inputs.
    cuts : list of int
        Every cut of the trace, in forward order (0 first).
    n_images : int
        Calibration images over all batches.
    """

    def __init__(self, model: nn.Module, data: Iterable, example: torch.Tensor, fingerprints: list[tuple]):
        self.data = data
        self.fingerprints = fingerprints
        self.n_images = sum(f[0][0] if f[0] else 1 for f in fingerprints)
        self._bind(model)
        self.cut, self.cache = 0, None
        # bytes per image of each cut's value, from the dense shapes (an upper bound once channels are cut)
        with evaluation_mode(self.gm):
            ShapeProp(self.gm).propagate(prepare_input(model, example))
        per = max(int(example.shape[0]), 1) if example.dim() else 1
        self.per_image: dict[str, float] = {}
        for i in self.cuts:
            meta = self.nodes[i].meta.get("tensor_meta")
            if isinstance(meta, TensorMetadata):
                item = torch.empty((), dtype=meta.dtype).element_size()
                self.per_image[self.nodes[i].name] = float(np.prod(meta.shape)) * item / per
        self.cuts = [i for i in self.cuts if i == 0 or self.nodes[i].name in self.per_image]

    @classmethod
    def create(cls, model: nn.Module, data: Iterable, example: torch.Tensor) -> tuple["CachedForward | None", str]:
        """``(CachedForward, "")``, or ``(None, why not)`` when the model does not trace with one
        input or the data does not repeat itself (a shuffling loader)."""
        try:
            first = [_fingerprint(_batch_input(b)) for b in data]
            if not first:
                return None, "no calibration batches"
            if [_fingerprint(_batch_input(b)) for b in data] != first:
                return None, "the data yields different batches on each pass (shuffled?)"
            return cls(model, data, example, first), ""
        except MipPruneError as exc:  # not traceable (fx's message), several inputs, …
            return None, str(exc)

    # ------------------------------------------------------------------ the trace
    def _bind(self, model: nn.Module) -> None:
        gm = fx_trace(model)
        nodes = list(gm.graph.nodes)
        placeholders = [i for i, n in enumerate(nodes) if n.op == "placeholder"]
        if placeholders != [0]:
            raise InvalidInputError(f"model must take one input for streamed calibration; got "
                                    f"{len(placeholders)} placeholders")
        index = {n: i for i, n in enumerate(nodes)}
        attrs = [n for n in nodes if n.op == "get_attr"]
        live_end = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
        free_after: list[list[torch.fx.Node]] = [[] for _ in nodes]
        cuts, reach = [], 0  # reach: the last node that any earlier (non-constant) value is used by
        for i, n in enumerate(nodes):
            if n.op in ("placeholder", "call_module", "call_function", "call_method") and reach <= i and n.users:
                cuts.append(i)
            if n.op != "get_attr":
                reach = max(reach, live_end[i])
                if live_end[i] > i:
                    free_after[live_end[i]].append(n)
        self.model, self.gm, self.nodes, self.index = model, gm, nodes, index
        self.attrs, self.free_after, self.cuts = attrs, free_after, cuts
        self.signature = [(n.name, n.op, str(n.target)) for n in nodes]
        self.module_nodes: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            if n.op == "call_module":
                self.module_nodes.setdefault(str(n.target), []).append(i)
        self.interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)

    def rebind(self, model: nn.Module) -> bool:
        """Carry the cache over to ``model`` (a rebuilt copy, e.g. after surgery): kept when its trace
        has the same nodes, else dropped. The caller vouches that every module that changed lies
        after the cut. Returns whether the cache was kept."""
        old = self.signature
        self._bind(model)
        self.cuts = [i for i in self.cuts if i == 0 or self.nodes[i].name in self.per_image]  # sizes known
        if self.signature != old:
            self.drop()
            return False
        return True

    def stop_index(self, layers: Iterable[str]) -> int:
        """The last node calling any of ``layers`` (what a capture of them must run to)."""
        hits = [i for n in layers for i in self.module_nodes.get(n, [])]
        if not hits:
            raise InvalidInputError(f"layers must be called by the traced forward; got none of {list(layers)}")
        return max(hits)

    def first_index(self, modules: Iterable[str]) -> int:
        """The first node whose result depends on any of ``modules`` (called, or a parameter of it
        read by ``get_attr``): a cut before it is unaffected by changes to them."""
        modules = set(modules)
        first = len(self.nodes)
        for m in modules:
            for i in self.module_nodes.get(m, []):
                first = min(first, i)
        for n in self.attrs:
            t = str(n.target)
            if any(t == m or t.startswith(m + ".") for m in modules) and n.users:
                first = min(first, min(self.index[u] for u in n.users))
        return first

    def cut_before(self, index: int) -> int:
        """The latest cut strictly before node ``index``."""
        return max(c for c in self.cuts if c < index)

    def estimated_bytes(self, cut: int) -> int:
        """Bytes of the cache at ``cut`` for all images (dense shapes: an upper bound)."""
        return 0 if cut == 0 else int(self.per_image[self.nodes[cut].name] * self.n_images)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now."""
        return 0 if self.cache is None else sum(t.numel() * t.element_size() for t in self.cache)

    def drop(self) -> None:
        """Forget the cache: batches run from their inputs (still truncated)."""
        self.cut, self.cache = 0, None

    # ------------------------------------------------------------------ running
    def _check(self, index: int, x: torch.Tensor) -> None:
        if index >= len(self.fingerprints) or _fingerprint(x) != self.fingerprints[index]:
            raise InvalidInputError(f"data must yield the same batches in the same order on every pass (streamed "
                                    f"calibration caches activations per batch); got a different batch {index}")

    def _run(self, start: int, value: torch.Tensor, stop: int) -> torch.Tensor:
        interp = self.interpreter
        env = {self.nodes[start]: value}
        for n in self.attrs:
            env[n] = interp.fetch_attr(n.target)
        interp.env = env
        try:
            for i in range(start + 1, stop + 1):
                node = self.nodes[i]
                env[node] = interp.run_node(node)
                if i < stop:
                    for dead in self.free_after[i]:
                        env.pop(dead, None)
            return env[self.nodes[stop]]
        finally:
            interp.env = {}

    def forward(self, index: int, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Run batch ``index`` (input ``x``) from the cache, or from ``x``, through node ``stop``."""
        self._check(index, x)
        if self.cache is None:
            return self._run(0, prepare_input(self.model, x), stop)
        if stop <= self.cut:
            raise InvalidInputError(f"stop must lie after the cached cut (node {self.cut}); got node {stop}")
        # a copy: the graph may modify its input in place (ReLU(inplace=True) after the cut)
        return self._run(self.cut, self.cache[index].clone(), stop)

    def runner(self, stop: int, *, skip_last: bool = False):
        """``forward(index, x)`` for :func:`~mipprune.pruning.bridge.capture`: batches run through ``stop``.

        ``skip_last``: node ``stop`` calls a module (called once in the trace) whose forward pre-hooks
        are all a capture needs (its inputs; targets recorded beforehand): its pre-hooks run, the
        module itself does not (a 3×3 consumer is most of its bottleneck's cost)."""
        node = self.nodes[stop]
        name = str(node.target) if node.op == "call_module" else None
        if not skip_last or name is None or len(self.module_nodes.get(name, [])) != 1:
            return lambda index, x: self.forward(index, x, stop)
        module = self.model.get_submodule(name)

        def stop_before(_m, _inp):
            raise _StopBefore

        def run(index, x):
            handle = module.register_forward_pre_hook(stop_before)  # after the capture's own pre-hooks
            try:
                self.forward(index, x, stop)
            except _StopBefore:
                pass
            finally:
                handle.remove()
        return run

    def advance(self, cut: int) -> None:
        """Cache the value at ``cut`` (a cut not before the current one) for every batch, computed with
        the current model from the current cache (or from the inputs); the old cache is released
        batch by batch."""
        if cut == self.cut and (self.cache is not None or cut == 0):
            return
        if cut not in self.cuts or (self.cache is not None and cut < self.cut):
            raise InvalidInputError(f"cut must be a cut at or after node {self.cut}; got node {cut}")
        if cut == 0:
            self.drop()
            return
        new = list(self.cache) if self.cache is not None else [None] * len(self.fingerprints)
        with evaluation_mode(self.model):
            for index, batch in enumerate(self.data):
                value = self.forward(index, _batch_input(batch), cut).detach()
                if value._base is not None:  # a view would keep its whole base alive
                    value = value.clone()
                new[index] = value
                if self.cache is not None:
                    self.cache[index] = None
        self.cut, self.cache = cut, new


def target_rows_bytes(model: nn.Module, rows: Mapping[str, int], names: Iterable[str]) -> int:
    """Bytes :func:`record_target_rows` keeps for ``names`` (``rows[name]`` sampled rows each, from
    :func:`~mipprune.pruning.group_pruning.calibration_rows`), in the model's dtype."""
    mods = dict(model.named_modules())
    total = 0
    for n in names:
        w = mods[n].weight
        total += int(rows[n]) * int(w.shape[0]) * w.element_size()
    return total


def record_target_rows(model: nn.Module, data: Iterable, names: Iterable[str], *, positions: int | None,
                       max_samples: int | None, seed: int, forward=None) -> dict[str, list[list]]:
    """Output rows of the Conv2d / Linear layers ``names`` of ``model`` at exactly the positions that
    :func:`~mipprune.pruning.bridge.capture` (same ``positions``, ``max_samples``, ``seed``, the same
    batches) samples for a layer of the same name and output size, for its ``target_rows``.

    Returns ``{name: [per batch: [per call: tensor (rows, out channels) or None once full]]}`` in the
    model's dtype, on its device. ``forward(index, x)`` runs a batch (default ``model(x)``); it runs
    under ``evaluation_mode``.
    """
    mods = dict(model.named_modules())
    names = list(dict.fromkeys(names))
    gens = {n: layer_generator(n, seed) for n in names}
    counts = dict.fromkeys(names, 0)
    out: dict[str, list[list]] = {n: [] for n in names}

    def hook(name):
        is_conv = isinstance(mods[name], nn.Conv2d)

        def record(_m, _i, y):
            y = y.detach()
            calls = out[name][-1]
            if max_samples is not None and counts[name] >= max_samples:
                calls.append(None)  # capture's accumulator is full: it samples nothing more
                return
            if is_conv:
                index = sample_positions(y.shape[0], y.shape[-2], y.shape[-1], positions, gens[name], y.device)
                rows = (y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if index is None
                        else y[index[0], :, index[1], index[2]])
            else:
                rows = y.reshape(-1, y.shape[-1])
            if max_samples is not None:
                rows = rows[: max_samples - counts[name]]
            counts[name] += rows.shape[0]
            calls.append(rows.clone())
        return record

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with evaluation_mode(model):
            for index, batch in enumerate(data):
                for n in names:
                    out[n].append([])
                x = _batch_input(batch)
                if forward is None:
                    model(prepare_input(model, x))
                else:
                    forward(index, x)
                if max_samples is not None and all(c >= max_samples for c in counts.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    return out
