"""The transformer side of :class:`~mipprune.pruning.selector.ChannelSelector`: heads and MLP neurons
selected with reconstruction, block by block.

``ChannelSelector.fit(model, data)`` comes here when a site adapter recognises the model
(:func:`mipprune.pruning.transformer_sites.find_adapter`: Hugging Face LLaMA / Qwen2 / Mistral / OPT /
GPT-2, and the torch / torchvision / BERT families of :mod:`mipprune.pruning.transformer_torch`).

Block-by-block calibration (as SparseGPT and Wanda do)
------------------------------------------------------
1. One pass of every calibration batch through the embeddings: each transformer block's ``forward``
   is replaced by a recorder that keeps the block's arguments (attention masks, rotary embeddings,
   per-layer sliding-window masks …) and returns its input, and the forward stops at the last block.
   The hidden states entering block 0 are the two *streams*: the pruned one (``Z``) and the dense one.
2. For each block in order, for each of its sites in forward order (attention, then MLP): the block
   runs on every batch of the pruned stream, its dense copy on the dense stream; hooks on the site's
   consumer accumulate ``G = ZᵀZ``, ``B = ZᵀY``, ``‖Y‖²`` (float64, :mod:`mipprune.pruning.bridge`'s
   accumulator) and the column sums of ``Z`` (for the FLAP / Wanda-sp criteria). **Z comes from the
   pruned prefix, Y from the dense block on the dense stream** (He et al.'s scheme, as the pair
   selector does), so the least-squares refit of the consumer also absorbs the error of the earlier
   sites. The site's units are selected, removed, and the consumer written with its refitted weights;
   the next site of the block then sees the pruned attention.
3. Both streams go through the block (pruned and dense) and on to the next one.

Only one block is on the compute ``device`` at a time (the model stays where it is and is moved a
block at a time: a CPU model can be pruned on one GPU); the streams (two copies of the hidden states
of the calibration set) stay on the device. A model whose blocks are not chained (an operation between
two blocks, e.g. Swin's patch merging) is run whole on the device instead, the input of such a
block captured by a forward of the pruned model (and of a dense copy) that stops there. Statistics are
built one site at a time: their float64 memory (``8·(2d² + 3dm)`` bytes for ``d`` consumer columns
and ``m`` outputs, with the selection problem's working copies) is estimated before the capture; a site
above ``max_memory`` stays whole and is named in the report, which also announces the peak.

Targets
-------
``sparsity``: every site keeps ``round(n·(1 − sparsity))`` units (at least ``min_units``). ``k``:
``{site or consumer name: units}``. ``params`` / ``flops``: the fraction of the transformer blocks'
parameters (embeddings, the LM head and final norm are not counted) or multiply-accumulates per token
at the calibration sequence length (projections and attention, no causal halving) to keep; with
``allocation="global"`` (default) one block-by-block pass over the *dense* model gives every site's
forward-greedy error curve (:func:`solvers.selection.greedy.forward_path`) and
:func:`solvers.allocate_budget` (HiGHS MILP) chooses non-uniform widths minimizing
``Σ_s w_s·err_s(k_s)``, with ``w_s = ‖Y_s‖² / ‖X_b‖²`` — the site's output energy relative to the
residual stream entering its block, so that ``w_s·err_s`` is the squared error the site adds to the
residual stream relative to that stream; ``allocation="uniform"`` keeps the same fraction of every
site (the largest within the target), then raises the neurons' fraction alone while the target allows
(heads come in coarse units), so every layer keeps the same widths. FLAP's compensation biases (added
to consumers that have none) count against a ``params`` target.

The selector's ``sequential`` and ``positions`` do not apply here (always sequential, every token
counts); ``max_samples`` caps the tokens per site.

Methods: those of :func:`solvers.select_channels` (with the least-squares refit; ``exact`` reports its
proven gap) and the criteria of :mod:`mipprune.pruning.transformer_criteria` (``magnitude_tp``,
``wanda_sp``, ``flap``): top-k by score *without* refit, as the baselines do; ``flap`` adds its bias
compensation to the consumer (creating a bias where the consumer has none).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from mipprune.pruning.transformer_sites import Site, SiteAdapter, finish
from solvers.errors import InfeasibleBudgetError, InvalidInputError, MipPruneError, UnsupportedLayerError
from solvers.result import SelectionResult, Status

__all__ = ["fit_transformer", "transformer_support", "transformer_report_rows", "transformer_report",
           "transformer_prune", "site_memory", "ALLOCATIONS"]

ALLOCATIONS = ("global", "uniform")
# Y of the consumers' least squares: "dense" (the dense block on the dense stream, He et al.) or "local"
# (the consumer's current weights on the pruned stream, as SparseGPT / OSSCAR); see the module docstring.
_TARGET = "dense"
_HIDDEN_KEYS = ("hidden_states", "src", "x", "input", "hidden")


class _Stop(Exception):
    """Raised inside a forward to stop it once the wanted inputs are recorded."""


# ------------------------------------------------------------------------------------ calibration data
def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "get_input_embeddings")


def _batches(model: nn.Module, data) -> list[tuple[tuple, dict]]:
    """The calibration batches as ``(args, kwargs)`` of the model's forward (tensors on their own device).

    Hugging Face models take token ids: a LongTensor (B, T) (or (T,)), a ``(ids, ...)`` tuple, or a
    dict of the model's inputs with ``input_ids``; they are checked against the vocabulary and run
    with ``use_cache=False`` where the forward takes it."""
    from mipprune.torch_utils import split_batch

    hf = _is_hf(model)
    vocab = model.get_input_embeddings().num_embeddings if hf else None
    import inspect

    params = inspect.signature(model.forward).parameters.values() if hf else ()
    takes_cache = any(p.name == "use_cache" or p.kind == p.VAR_KEYWORD for p in params)
    out = []
    for i, batch in enumerate(data):
        if isinstance(batch, Mapping):
            kwargs = dict(batch)
            if hf and "input_ids" not in kwargs:
                raise InvalidInputError(f"calibration batch {i} must hold 'input_ids' (token ids) when given as a "
                                        f"dict; got keys {sorted(kwargs)}")
            bad = [k for k, v in kwargs.items() if not isinstance(k, str)]
            if bad:
                raise InvalidInputError(f"calibration batch {i} dict keys must be argument names; got {bad}")
            args: tuple = ()
        else:
            x, _ = split_batch(batch)
            args, kwargs = ((), {"input_ids": x}) if hf else ((x,), {})
        if hf:
            ids = kwargs["input_ids"]
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                what = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise InvalidInputError(f"calibration batch {i} must be token ids: an integer tensor (batch, sequence) "
                                        f"or a dict with 'input_ids'; got {what}")
            if ids.ndim == 1:
                ids = ids[None]
                kwargs = {k: (v[None] if isinstance(v, torch.Tensor) and v.ndim == 1 else v) for k, v in kwargs.items()}
            if ids.ndim != 2 or ids.numel() == 0:
                raise InvalidInputError(f"calibration batch {i} token ids must have shape (batch, sequence) with at "
                                        f"least one token; got shape {tuple(ids.shape)}")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise InvalidInputError(f"calibration batch {i} must hold token ids in [0, {vocab}) (the model's "
                                        f"vocabulary); got ids {lo}..{hi}")
            kwargs["input_ids"] = ids
            if takes_cache:
                kwargs["use_cache"] = False
        out.append((args, kwargs))
    if not out:
        raise InvalidInputError("data must yield at least one batch; got none")
    return out


def _seq_len(batches) -> int:
    t = 1
    for args, kwargs in batches:
        x = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(x, torch.Tensor) and x.ndim >= 2:
            t = max(t, int(x.shape[1]))
    return t


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run(model: nn.Module, batch, device, index: int):
    from mipprune.torch_utils import prepare_input

    args, kwargs = batch
    args = tuple(prepare_input(model, a, device) if isinstance(a, torch.Tensor) else a for a in args)
    try:
        return model(*args, **_to(kwargs, device))
    except (_Stop, MipPruneError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        shapes.update({f"arg{j}": tuple(a.shape) for j, a in enumerate(args) if isinstance(a, torch.Tensor)})
        raise InvalidInputError(f"calibration batch {index} must be an input the model takes; got {shapes}, and the "
                                f"forward raised {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------- block inputs
def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in _HIDDEN_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise UnsupportedLayerError("a transformer block must take its hidden states as its first argument (or as "
                                f"one of {list(_HIDDEN_KEYS)}); got arguments {list(kwargs)}")


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (h, *args[1:]), kwargs
    for key in _HIDDEN_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: h}
    return args, kwargs  # pragma: no cover - _hidden_of raised before


def _output_hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_except(model: nn.Module, skip: set[str], device, prefix: str = "") -> None:
    """Move every submodule of ``model`` to ``device`` except the modules named in ``skip``."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if full in skip:
            continue
        if any(s.startswith(full + ".") for s in skip):
            _move_except(child, skip, device, full + ".")
        else:
            child.to(device)
    for key, p in model._parameters.items():
        if p is not None:
            p.data = p.data.to(device)
    for key, b in model._buffers.items():
        if b is not None:
            model._buffers[key] = b.to(device)


def _record_inputs(model: nn.Module, blocks: list[str], batches, device):
    """One forward per batch with every block replaced by a recorder (see the module docstring).

    Returns ``(calls, chained)``: ``calls[j][b] = (args, kwargs)`` of block ``j`` on batch ``b`` (the hidden
    states of block 0 are the real ones), and ``chained[j]``: block ``j`` reads block ``j − 1``'s output as
    is (always true for ``j = 0``)."""
    mods = [model.get_submodule(b) for b in blocks]
    nb = len(batches)
    calls = [[None] * nb for _ in blocks]
    chained = [True] * len(blocks)
    state = {"batch": 0, "extra": None}
    returned: dict[int, torch.Tensor] = {}

    def make(j: int, mod: nn.Module):
        real = mod.forward

        def recorder(*args, **kwargs):
            h = _hidden_of(args, kwargs)
            calls[j][state["batch"]] = (args, kwargs)
            if j > 0 and returned.get(j - 1) is not h:
                chained[j] = False
            if j == len(mods) - 1:
                raise _Stop
            if state["extra"] is None:  # learn the block's output structure once (a real forward)
                out = real(*args, **kwargs)
                state["extra"] = tuple(out[1:]) if isinstance(out, (tuple, list)) else ()
                state["tuple"] = isinstance(out, (tuple, list))
            returned[j] = h
            return (h, *state["extra"]) if state["tuple"] else h
        return recorder

    for j, mod in enumerate(mods):
        mod.forward = make(j, mod)
    try:
        for b, batch in enumerate(batches):
            state["batch"] = b
            returned.clear()
            try:
                _run(model, batch, device, b)
            except _Stop:
                pass
    finally:
        for mod in mods:
            del mod.forward
    missing = [blocks[j] for j in range(len(blocks)) if any(c is None for c in calls[j])]
    if missing:
        raise UnsupportedLayerError(f"every transformer block must run in the model's forward; got no call of {missing[:4]}")
    return calls, chained


def _catch(model: nn.Module, block: str, batch, device, index: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that ``block`` receives when ``model`` runs ``batch`` (the forward stops there)."""
    got = {}

    def hook(_mod, args, kwargs):
        got["call"] = (args, kwargs)
        raise _Stop

    handle = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run(model, batch, device, index)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["call"]


# ------------------------------------------------------------------------------------------ statistics
def site_memory(site: Site, out_features: int) -> int:
    """Bytes of float64 statistics one site's selection needs: Gram (d²), its symmetrized copy in the
    selection problem (d²), cross, weights and refit (3·d·m)."""
    d = site.n_columns
    return 8 * (2 * d * d + 3 * d * int(out_features))


class _SiteStats:
    def __init__(self, st, mean, n_rows):
        self.st, self.mean, self.n_rows = st, mean, n_rows


def _local(site: Site, name: str) -> str:
    if not name.startswith(site.block + "."):
        raise UnsupportedLayerError(f"site consumer {name!r} must lie inside its block {site.block!r}")
    return name[len(site.block) + 1:]


def _capture(site: Site, block_p: nn.Module, block_d: nn.Module | None, calls, xp, xd, device,
             max_samples, seed, masks=None) -> _SiteStats:
    """Statistics of ``site``'s consumer: Z from ``block_p`` on ``xp``; Y from ``block_d`` on ``xd`` (or
    from ``block_p`` itself when ``block_d`` is None). ``masks[b]``: (B, T) attention mask of batch ``b``
    (padding positions are left out of the statistics) or None."""
    from mipprune.pruning.bridge import _Accumulator

    local = _local(site, site.consumer)
    cons_p = block_p.get_submodule(local)
    if not isinstance(cons_p, nn.Linear):
        raise UnsupportedLayerError(f"site consumer {site.consumer!r} must be nn.Linear after prepare; got "
                                    f"{type(cons_p).__name__}")
    with_target = block_d is not None
    acc = _Accumulator(site.consumer, cons_p, site.unit_columns, None, max_samples, seed, device)
    sums = torch.zeros(cons_p.in_features, dtype=torch.float64, device=device)
    rows = [0]
    keep = [None]  # tokens of the current batch that are not padding (its attention_mask), or None

    def tokens_of(t: torch.Tensor) -> torch.Tensor:
        m = keep[0]
        return t[m] if m is not None and t.shape[:-1] == m.shape else t

    def on_p(_m, inp, out):
        x, out = tokens_of(inp[0]), tokens_of(out)
        z = x.detach().reshape(-1, cons_p.in_features)
        sums.add_(z.sum(0, dtype=torch.float64))
        rows[0] += z.shape[0]
        acc.on_input(x, out, with_target)

    handles = [cons_p.register_forward_hook(on_p)]
    if with_target:
        handles.append(block_d.get_submodule(local).register_forward_hook(
            lambda _m, _i, out: acc.on_target(tokens_of(out))))
    try:
        for b in range(len(xp)):
            mask = masks[b] if masks is not None else None
            keep[0] = None if mask is None else mask.to(device=device, dtype=torch.bool)
            args, kwargs = _with_hidden(*calls[b], xp[b])
            block_p(*args, **kwargs)
            if with_target:
                args, kwargs = _with_hidden(*calls[b], xd[b])
                block_d(*args, **kwargs)
            acc.end_batch()
    finally:
        for h in handles:
            h.remove()
    st = acc.statistics()
    if not (np.isfinite(st.target_sq) and np.isfinite(st.gram).all() and np.isfinite(st.cross).all()):
        raise InvalidInputError(f"calibration data must give finite activations; got NaN/inf at {site.consumer!r}")
    if st.target_sq <= 0:
        raise InvalidInputError(f"site {site.name!r} must have a non-zero output on the calibration data to be "
                                "reconstructed; got an all-zero output")
    return _SiteStats(st, (sums / max(rows[0], 1)).cpu().numpy(), rows[0])


def _propagate(block: nn.Module, calls, xs) -> None:
    for b in range(len(xs)):
        args, kwargs = _with_hidden(*calls[b], xs[b])
        xs[b] = _output_hidden(block(*args, **kwargs)).detach()


class _Walk:
    """Block-by-block traversal of a prepared model with a pruned and (optionally) a dense stream."""

    def __init__(self, prepared: nn.Module, sites: list[Site], batches, device, home, *, two_streams: bool):
        self.model, self.batches, self.device, self.home = prepared, batches, device, home
        self.blocks = list(dict.fromkeys(s.block for s in sites))
        self.sites = {b: [s for s in sites if s.block == b] for b in self.blocks}
        self.two = two_streams
        block_set = set(self.blocks)
        self.offload = device != home
        if self.offload:
            _move_except(prepared, block_set, device)
            prepared.get_submodule(self.blocks[0]).to(device)
        self.calls, self.chained = _record_inputs(prepared, self.blocks, batches, device)
        self.whole = not all(self.chained)
        if self.offload:
            prepared.get_submodule(self.blocks[0]).to(home)
        if self.whole:  # a non-chained block: run the whole model on the device, keep a dense copy for Y
            prepared.to(device)
            self.offload = False
            self.dense_model = copy.deepcopy(prepared) if two_streams else None
        self.xp = [_hidden_of(*call).detach().to(device) for call in self.calls[0]]
        self.xd = list(self.xp) if two_streams else None
        # the recorded calls keep their other arguments only: the streams hold the hidden states
        hole = torch.empty(0)
        self.calls = [[_with_hidden(*call, hole) for call in row] for row in self.calls]
        # padding positions (attention_mask == 0) stay out of the statistics
        self.masks = [kw.get("attention_mask") if isinstance(kw.get("attention_mask"), torch.Tensor) else None
                      for _, kw in batches]
        if all(m is None for m in self.masks):
            self.masks = None

    def stream_bytes(self) -> int:
        n = sum(x.numel() * x.element_size() for x in self.xp)
        return n * (2 if self.two else 1)

    def enter(self, j: int):
        """(pruned block, dense copy or None, its calls) of block ``j``, on the device."""
        name = self.blocks[j]
        if j > 0 and not self.chained[j]:
            for b, batch in enumerate(self.batches):
                call = _catch(self.model, name, batch, self.device, b)
                self.xp[b] = _hidden_of(*call).detach()
                self.calls[j][b] = call
                if self.two:
                    self.xd[b] = _hidden_of(*_catch(self.dense_model, name, batch, self.device, b)).detach()
        block = self.model.get_submodule(name)
        if self.offload:
            block.to(self.device)
        dense = copy.deepcopy(block) if self.two else None
        calls = [_to(c, self.device) for c in self.calls[j]] if self.offload else self.calls[j]
        return block, dense, calls

    def leave(self, j: int, block, dense, calls) -> None:
        last = j == len(self.blocks) - 1
        if not last and self.chained[j + 1]:
            _propagate(block, calls, self.xp)
            if self.two:
                _propagate(dense, calls, self.xd)
        if self.offload:
            block.to(self.home)


# ------------------------------------------------------------------------------------------ selection
def _select(selector, site: Site, stats: _SiteStats, k: int, prepared: nn.Module):
    """(SelectionResult, consumer bias or None) of keeping ``k`` units of ``site``."""
    from solvers.selection.problem import SelectionProblem
    from solvers.selection.select import select_channels

    st = stats.st
    problem = SelectionProblem(st.gram, st.cross, st.target_sq, site.column_units(), weights=st.weights)
    from mipprune.pruning.transformer_criteria import TRANSFORMER_CRITERIA

    if selector.method not in TRANSFORMER_CRITERIA:
        res = select_channels(problem, k=k, method=selector.method, backend=selector.backend,
                              time_limit=selector.time_limit, seed=selector.seed, gap=selector.gap,
                              options=getattr(selector, "method_options", None))
        return res, problem, None
    from mipprune.pruning.transformer_criteria import flap_bias, unit_scores

    start = time.perf_counter()
    producers = None
    if selector.method == "magnitude_tp" and site.producer_weights is not None:
        producers = [w.detach().to("cpu", torch.float64).numpy() for w in site.producer_weights(prepared)]
    scores = unit_scores(selector.method, site, weight=st.weights, gram=st.gram, mean=stats.mean,
                         n_samples=max(stats.n_rows, 1), producer_weights=producers)
    order = np.lexsort((np.arange(scores.size), -scores))
    mask = np.zeros(site.n_units, dtype=bool)
    mask[order[:k]] = True
    W = problem.weights * problem.column_mask(mask)[:, None]   # no refit: the baselines keep their weights
    bias = None
    if selector.method == "flap":
        cons = prepared.get_submodule(site.consumer)
        old = np.zeros(cons.out_features) if cons.bias is None else cons.bias.detach().double().cpu().numpy()
        bias = old + flap_bias(site, np.flatnonzero(mask), st.weights, stats.mean)
    res = SelectionResult(mask=mask, weights=W, objective=problem.error_of(W), bound=None, gap=None,
                          status=Status.FEASIBLE, method=selector.method, backend="criterion",
                          solve_time=time.perf_counter() - start, info={"scores": scores})
    return res, problem, bias


# ---------------------------------------------------------------------------------------------- budgets
def _block_params(prepared: nn.Module, blocks: list[str]) -> int:
    return sum(p.numel() for b in blocks for p in prepared.get_submodule(b).parameters())


def _cost_terms(prepared, sites: list[Site], metric: str, seq_len: int, flap: bool = False
                ) -> tuple[float, dict[str, float]]:
    """(fixed cost, per-unit cost of each site) of the blocks (``flap``: with the biases FLAP adds)."""
    per = {s.name: float(s.params_per_unit if metric == "params" else s.flops_per_unit(seq_len)) for s in sites}
    if metric == "flops":
        return 0.0, per
    blocks = list(dict.fromkeys(s.block for s in sites))
    fixed = _block_params(prepared, blocks) - sum(s.n_units * per[s.name] for s in sites)
    if flap:  # FLAP's compensation gives a bias to every pruned consumer that has none: count it up front
        fixed += sum(prepared.get_submodule(s.consumer).out_features for s in sites
                     if prepared.get_submodule(s.consumer).bias is None)
    if fixed < 0:
        raise UnsupportedLayerError(f"the sites' parameters must not exceed their blocks' ({fixed:.0f} left); the "
                                    "adapter's params_per_unit is inconsistent")
    return float(fixed), per


def _uniform_widths(sites, fixed, per, target, dense) -> dict[str, int]:
    """The same fraction of every site (the largest within the target), then the neurons' fraction raised
    alone while the target allows: heads come in coarse units (a layer has a few), so a common fraction
    would often land far below the target; every layer still keeps the same widths."""
    def widths(f_heads, f_neurons):
        return {s.name: max(s.min_units, min(s.n_units, math.floor(
            s.n_units * (f_heads if s.kind == "heads" else f_neurons) + 0.5))) for s in sites}

    def cost(w):
        return fixed + sum(per[s.name] * w[s.name] for s in sites)

    def largest(fit) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fit(mid) else (lo, mid)
        return lo

    f = largest(lambda v: cost(widths(v, v)) <= target * dense)
    u = largest(lambda v: cost(widths(f, f + v * (1.0 - f))) <= target * dense)
    return widths(f, f + u * (1.0 - f))


def _targets(selector, prepared, sites: list[Site], walk_factory, seq_len: int, on_step):
    """(``{site name: units to keep}``, budget summary or None)."""
    if selector.sparsity is not None:
        return {s.name: max(s.min_units, math.floor(s.n_units * (1.0 - selector.sparsity) + 0.5)) for s in sites}, None
    if selector.k is not None:
        by = {}
        for s in sites:
            by[s.name] = s
            by[s.consumer] = s
        out = {}
        for name, v in selector.k.items():
            if name not in by:
                raise InvalidInputError(f"k keys must be transformer sites (e.g. {[s.name for s in sites[:2]]}) or "
                                        f"their consumers; got {name!r}")
            s = by[name]
            if not s.min_units <= v <= s.n_units:
                raise InvalidInputError(f"k[{name!r}] must satisfy {s.min_units} <= k <= {s.n_units} (units of "
                                        f"{s.name!r}); got {v}")
            out[s.name] = v
        return out, None
    metric = "flops" if selector.flops is not None else "params"
    target = selector.flops if selector.flops is not None else selector.params
    fixed, per = _cost_terms(prepared, sites, metric, seq_len, flap=selector.method == "flap")
    dense = _cost_terms(prepared, sites, metric, seq_len)[0] + sum(per[s.name] * s.n_units for s in sites)
    floor = (fixed + sum(per[s.name] * s.min_units for s in sites)) / dense
    if target < floor:
        raise InfeasibleBudgetError(
            f"{metric} must be >= {floor:.4f} (one head / kv group and one neuron kept per site; the residual stream, "
            f"norms and embeddings stay whole, and only the transformer blocks are counted); got {target:g}")
    allocation = getattr(selector, "allocation", "global")
    summary = {"metric": metric, "target": float(target), "tolerance": selector.budget_tolerance,
               "window": [(1.0 - selector.budget_tolerance) * target, float(target)], "dense": dense,
               "floor": floor, "seq_len": seq_len, "scope": "transformer blocks", "allocation_mode": allocation}
    if allocation == "uniform":
        widths = _uniform_widths(sites, fixed, per, target, dense)
        summary["allocation"] = {"backend": "bisection", "status": "feasible", "objective": None, "bound": None,
                                 "gap": None}
    else:
        from solvers.budget import LayerBudget, allocate_budget

        t0 = time.perf_counter()
        curves, weights, skipped = _dense_curves(walk_factory, sites, selector, on_step)
        layers = []
        for s in sites:
            if s.name in curves:
                err = np.asarray(curves[s.name], dtype=np.float64)
                if s.min_units > 1:
                    err[: s.min_units - 1] = err.max() + 1.0
                layers.append(LayerBudget(s.name, s.n_units, err, flops_per_pair=per[s.name] if metric == "flops" else 0,
                                          params_per_pair=per[s.name] if metric == "params" else 0, in_channels=1,
                                          weight=weights[s.name]))
            else:
                layers.append(LayerBudget(s.name, s.n_units, None, flops_per_pair=per[s.name] if metric == "flops" else 0,
                                          params_per_pair=per[s.name] if metric == "params" else 0, in_channels=1,
                                          prunable=False))
        if fixed > 0:
            layers.append(LayerBudget("(fixed)", 1, None, params_fixed=fixed, flops_fixed=0.0, prunable=False))
        # the allocation's own dense total counts FLAP's future biases: rescale the target to ours
        alloc_target = min(1.0, target * dense / (fixed + sum(per[s.name] * s.n_units for s in sites)))
        alloc = allocate_budget(layers, alloc_target, metric=metric, backend=selector.budget_backend,
                                time_limit=selector.budget_time_limit, tolerance=selector.budget_tolerance)
        widths = {s.name: alloc.widths[s.name] for s in sites}
        summary["allocation"] = {"backend": alloc.backend, "status": str(alloc.status.value),
                                 "objective": alloc.objective, "bound": alloc.bound, "gap": alloc.gap}
        summary["curve_time"] = time.perf_counter() - t0
        summary["curves"] = "forward-greedy refit error per width on the dense model, weighted by ‖Y‖²/‖X_block‖²"
        summary["kept_whole_for_memory"] = skipped
    summary["widths"] = dict(widths)
    summary["predicted"] = fixed + sum(per[s.name] * widths[s.name] for s in sites)
    summary["predicted_ratio"] = summary["predicted"] / dense
    return widths, summary


def _dense_curves(walk_factory, sites, selector, on_step):
    """Forward-greedy error curves of every site on the dense model (block by block, one site's
    statistics at a time), and the residual-stream weights."""
    from solvers.selection.greedy import forward_path
    from solvers.selection.problem import SelectionProblem

    walk = walk_factory(two_streams=False)
    curves, weights, skipped = {}, {}, {}
    with torch.no_grad():
        for j, name in enumerate(walk.blocks):
            block, _, calls = walk.enter(j)
            stream = float(sum(float((x.double() ** 2).sum()) for x in walk.xp))
            for s in walk.sites[name]:
                on_step(f"error curve {s.name}")
                out_f = walk.model.get_submodule(s.consumer).out_features
                if selector.max_memory is not None and site_memory(s, out_f) > selector.max_memory:
                    skipped[s.name] = f"{site_memory(s, out_f) / 2**20:.0f} MiB > max_memory"
                    continue
                stats = _capture(s, block, None, calls, walk.xp, None, walk.device, selector.max_samples, selector.seed,
                                 walk.masks)
                st = stats.st
                problem = SelectionProblem(st.gram, st.cross, st.target_sq, s.column_units(), weights=st.weights)
                curves[s.name] = forward_path(problem)[1]
                weights[s.name] = st.target_sq / stream if stream > 0 else 1.0
            walk.leave(j, block, None, calls)
    return curves, weights, skipped


# ------------------------------------------------------------------------------------------------ fit
def fit_transformer(selector, model: nn.Module, data, adapter: SiteAdapter, *, fingerprint, progress):
    """``ChannelSelector.fit`` for a model with a site adapter (see the module docstring)."""
    from mipprune.pruning.transformer_criteria import TRANSFORMER_CRITERIA
    from mipprune.torch_utils import model_device, resolve_device
    from solvers.selection.select import METHODS

    start = time.perf_counter()
    if selector.method not in METHODS and selector.method not in TRANSFORMER_CRITERIA:
        raise InvalidInputError(f"method must be one of {sorted({*METHODS, *TRANSFORMER_CRITERIA})} for a transformer "
                                f"({adapter.family}); got {selector.method!r}")
    batches = _batches(model, data)
    home = model_device(model)
    dev = resolve_device(selector.device, model)
    seq_len = _seq_len(batches)
    prepared = adapter.prepare(model)
    sites = adapter.sites(prepared)
    if not sites:
        raise UnsupportedLayerError(f"model must have attention heads or MLP neurons to prune; the {adapter.family} "
                                    "adapter found none")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise UnsupportedLayerError(f"site names must be unique; got {names}")
    sig = [(s.name, s.kind, s.n_units, s.unit_columns) for s in sites]
    dense_params = _block_params(prepared, list(dict.fromkeys(s.block for s in sites)))
    flops_per = {s.name: s.flops_per_unit(seq_len) for s in sites}
    modes = [(m, m.training) for m in prepared.modules()]
    prepared.eval()

    def walk_factory(two_streams: bool):
        return _Walk(prepared, adapter.sites(prepared), batches, dev, home, two_streams=two_streams)

    results: dict[str, SelectionResult] = {}
    plans: dict[str, tuple] = {}
    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    peak = 0
    with progress(selector.progress) as bar, torch.no_grad():
        task = bar.add_task("budget", total=None)
        targets, budget = _targets(selector, prepared, sites, walk_factory, seq_len,
                                   lambda msg: bar.update(task, description=msg))
        bar.update(task, total=1, completed=1)
        walk = walk_factory(two_streams=True)
        task = bar.add_task("blocks", total=len(walk.blocks))
        for j, bname in enumerate(walk.blocks):
            block, dense, calls = walk.enter(j)
            for site in walk.sites[bname]:
                k = targets.get(site.name, site.n_units)
                if k >= site.n_units:
                    continue
                out_f = prepared.get_submodule(site.consumer).out_features
                need = site_memory(site, out_f)
                if selector.max_memory is not None and need > selector.max_memory:
                    skipped[site.name] = (f"statistics need {need / 2**20:.1f} MiB > max_memory "
                                          f"{selector.max_memory / 2**20:.1f} MiB")
                    continue
                peak = max(peak, need)
                bar.update(task, description=f"calibrating {site.name}")
                t0 = time.perf_counter()
                stats = _capture(site, block, dense if _TARGET == "dense" else None, calls, walk.xp, walk.xd,
                                 walk.device, selector.max_samples, selector.seed, walk.masks)
                capture_time = time.perf_counter() - t0
                bar.update(task, description=f"selecting {site.name} ({selector.method})")
                res, problem, bias = _select(selector, site, stats, k, prepared)
                keep = np.flatnonzero(res.mask)
                cols = problem.column_mask(res.mask)
                weight = res.weights[cols]
                site.apply(prepared, keep, weight, bias)
                results[site.name] = res
                plans[site.name] = (keep, weight, bias)
                rows[site.name] = {"error_no_refit": problem.error(res.mask, refit=False), "capture_time": capture_time,
                                   "n_samples": int(stats.st.n_samples), "memory": need}
            block = prepared.get_submodule(bname)   # the sites replaced its modules in place
            walk.leave(j, block, dense, calls)
            del dense
            bar.advance(task)
    for m, flag in modes:
        m.training = flag
    prepared.to(home)
    final_sites = adapter.sites(prepared)
    if getattr(adapter, "finish", None) is None:
        from mipprune.pruning.transformer_hf import record_sizes

        record_sizes(prepared, final_sites)
    pruned = finish(adapter, prepared)
    if budget is not None:
        achieved = (_block_params(prepared, list(dict.fromkeys(s.block for s in final_sites)))
                    if budget["metric"] == "params" else sum(flops_per[s.name] * s.n_units for s in final_sites))
        lo, hi = budget["window"]
        budget.update(achieved=float(achieved), achieved_ratio=achieved / budget["dense"],
                      in_window=bool(lo - 1e-9 <= achieved / budget["dense"] <= hi + 1e-9))
    selector.graph_ = None
    selector.sites_ = sites
    selector.adapter_ = adapter
    selector.groups_ = sites
    selector.masks_ = {s.name: (results[s.name].mask.copy() if s.name in results else np.ones(s.n_units, bool))
                       for s in sites}
    selector.results_ = results
    selector.skipped_ = skipped
    selector._plans = plans
    selector._rows = rows
    selector._site_signature = sig
    selector.allocation_ = None
    selector.budget_ = budget
    selector.tecu_history_ = None
    selector.memory_ = {"peak_site_bytes": int(peak), "streams_bytes": int(walk.stream_bytes()),
                        "max_memory": selector.max_memory, "mode": "whole model" if walk.whole else
                        ("block-by-block, offloaded" if dev != home else "block-by-block")}
    selector.transformer_ = {"family": adapter.family, "seq_len": seq_len, "dense_block_params": dense_params,
                             "pruned_block_params": _block_params(prepared, list(dict.fromkeys(s.block for s in final_sites))),
                             "device": str(dev)}
    selector.pruned_model_ = pruned
    selector.example_input_ = None
    selector.fit_time_ = time.perf_counter() - start
    selector._fitted_id = id(model)
    selector._fitted_fingerprint = fingerprint(model)
    return selector


# ---------------------------------------------------------------------------------------------- reading
def _site_named(selector, layer: str) -> Site:
    for s in selector.sites_:
        if layer in (s.name, s.consumer):
            return s
    raise InvalidInputError(f"layer must be a transformer site (e.g. {[s.name for s in selector.sites_[:2]]}) or its "
                            f"consumer; got {layer!r}")


def transformer_support(selector, layer: str) -> np.ndarray:
    """Bool mask (n_units,) of the kept heads / kv groups / neurons of site ``layer``."""
    return selector.masks_[_site_named(selector, layer).name].copy()


def transformer_report_rows(selector) -> list[dict]:
    """One row per pruned site: ``layer`` (site name), ``type`` (heads / neurons), ``unit``, ``consumer``,
    ``kept``, ``total``, ``rel_error``, ``error_no_refit``, ``bound``, ``gap``, ``status``, ``method``,
    ``backend``, ``solve_time``, ``capture_time``, ``n_samples``, ``memory`` (bytes of its statistics)."""
    rows = []
    for s in selector.sites_:
        res = selector.results_.get(s.name)
        if res is None:
            continue
        extra = selector._rows[s.name]
        per = s.info.get("heads", s.n_units) // s.n_units if s.kind == "heads" else 1
        rows.append({"layer": s.name, "type": s.kind, "unit": s.info.get("unit", s.kind), "consumer": s.consumer,
                     "kept": res.k, "total": s.n_units, "heads_kept": res.k * per if s.kind == "heads" else None,
                     "heads_total": s.n_units * per if s.kind == "heads" else None, "rel_error": float(res.objective),
                     "error_no_refit": float(extra["error_no_refit"]), "bound": res.bound, "gap": res.gap,
                     "status": str(res.status.value), "method": res.method, "backend": res.backend,
                     "solve_time": float(res.solve_time), "capture_time": float(extra["capture_time"]),
                     "n_samples": extra["n_samples"], "memory": int(extra["memory"])})
    return rows


def transformer_report(selector, table_cls):
    """The selector's report table for transformer sites (``table_cls``: the selector's ReportTable)."""
    t = selector.transformer_
    table = table_cls(title=f"Transformer pruning ({t['family']}, method {selector.method}, "
                            f"{selector._target_repr()}, block by block)")
    for col, just in [("site", "left"), ("unit", "left"), ("kept", "right"), ("rel. error", "right"),
                      ("no refit", "right"), ("bound", "right"), ("gap", "right"), ("time s", "right"),
                      ("status", "left")]:
        table.add_column(col, justify=just, no_wrap=True)
    for r in transformer_report_rows(selector):
        kept = f"{r['kept']}/{r['total']}"
        if r["heads_kept"] is not None and r["unit"] != "head":
            kept += f" ({r['heads_kept']}/{r['heads_total']} heads)"
        table.add_row(r["layer"], f"{r['unit']}s", kept, f"{r['rel_error']:.4f}",
                      f"{r['error_no_refit']:.4f}", "-" if r["bound"] is None else f"{r['bound']:.4f}",
                      "-" if r["gap"] is None else f"{100 * r['gap']:.2f}%", f"{r['solve_time']:.2f}", r["status"])
    mem = selector.memory_
    lines = [
        "rel. error: ‖Y − Ŷ‖²/‖Y‖² of the site's consumer output (Z from the pruned prefix, Y from the dense "
        "model), after the least-squares refit (criteria: without refit); bound / gap: proven (exact only)",
        "the residual stream stays whole: hidden size, embeddings, norms and every block's input / output width "
        "are untouched; only attention heads (kv groups under GQA) and MLP neurons are removed",
        f"block parameters: {t['pruned_block_params']:,} of {t['dense_block_params']:,} "
        f"({t['pruned_block_params'] / max(t['dense_block_params'], 1):.4f}; embeddings and LM head not counted); "
        f"calibration sequence length {t['seq_len']}",
        f"memory ({mem['mode']}, {t['device']}): peak statistics of one site {mem['peak_site_bytes'] / 2**20:.1f} MiB"
        + ("" if mem["max_memory"] is None else f" (max_memory {mem['max_memory'] / 2**20:.1f} MiB)")
        + f", calibration hidden-state streams {mem['streams_bytes'] / 2**20:.1f} MiB",
    ]
    for name, why in selector.skipped_.items():
        lines.append(f"kept whole for memory: {name}: {why}")
    short = [f"{r['layer']} ({r['n_samples']} < {s.n_columns})" for r, s in
             zip(transformer_report_rows(selector), [x for x in selector.sites_ if x.name in selector.results_])
             if r["n_samples"] < s.n_columns]
    if short:
        lines.append("fewer calibration tokens than consumer columns (the refit may overfit; add data): "
                     + ", ".join(short[:6]) + (f", … {len(short) - 6} more" if len(short) > 6 else ""))
    b = selector.budget_
    if b is not None:
        a = b["allocation"]
        gap = "-" if a.get("gap") is None else f"{100 * a['gap']:.2f}%"
        lo, hi = b["window"]
        lines.append(f"{b['metric']} budget {b['target']:g} of the transformer blocks ({b['allocation_mode']}): achieved "
                     f"{b['achieved_ratio']:.4f} ({'in' if b['in_window'] else 'OUTSIDE'} [{lo:.4f}, {hi:.4f}]); "
                     f"allocation {a['backend']} {a['status']}, gap {gap}")
    sizes = getattr(getattr(selector.pruned_model_, "config", None), "mipprune_layer_sizes", None)
    if isinstance(sizes, dict):
        lines.append("save_pretrained: " + ("from_pretrained loads it (same widths in every layer)"
                                            if sizes.get("from_pretrained") else
                                            "load with mipprune.load_pruned(folder) (per-layer widths)"))
    table.caption = "\n".join(lines)
    return table


def transformer_prune(selector, model: nn.Module, reconstruct: bool) -> nn.Module:
    """``ChannelSelector.prune`` for transformer sites: the stored kept units (and, with ``reconstruct``,
    the refitted consumer weights and FLAP biases) applied to a copy of ``model``."""
    from mipprune.pruning.transformer_sites import find_adapter

    adapter = find_adapter(model)
    if adapter is None or adapter.family != selector.adapter_.family:
        got = "no transformer family" if adapter is None else adapter.family
        raise InvalidInputError(f"model must be a {selector.adapter_.family} transformer like the fitted one; got {got}")
    prepared = adapter.prepare(model)
    sites = adapter.sites(prepared)
    sig = [(s.name, s.kind, s.n_units, s.unit_columns) for s in sites]
    if sig != selector._site_signature:
        raise InvalidInputError(f"model must have the heads and neurons of the fitted one {selector._site_signature[:3]}…; "
                                f"got {sig[:3]}…")
    for s in sites:
        plan = selector._plans.get(s.name)
        if plan is not None:
            keep, weight, bias = plan
            s.apply(prepared, keep, weight if reconstruct else None, bias if reconstruct else None)
    if getattr(adapter, "finish", None) is None:
        from mipprune.pruning.transformer_hf import record_sizes

        record_sizes(prepared, adapter.sites(prepared))
    return finish(adapter, prepared)
