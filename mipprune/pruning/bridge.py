"""The activation bridge: run a torch model on calibration data and keep only Gram statistics.

For every requested ``nn.Conv2d`` / ``nn.Linear`` layer, forward hooks see the layer's input and
output. The input is unfolded into rows of ``Z`` (one row per sampled output position; ``d`` columns
ordered channel-major, exactly like ``F.unfold`` and ``weight.reshape(out, -1)``), the output minus
bias at the same positions gives ``Y`` (so ``Y = Z W`` for the layer's own weights), and only

    G = ZᵀZ (d×d),   B = ZᵀY (d×m),   ‖Y‖²

are accumulated, in float64 on the model's device. Memory does not grow with the number of batches,
and :meth:`LayerStatistics.problem` turns the result into a :class:`solvers.SelectionProblem`.
"""
from __future__ import annotations

import collections
import copy
import itertools
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.linalg.blas as blas
import torch
import torch.nn.functional as F
from torch import nn

from mipprune.torch_utils import evaluation_mode, model_device, prepare_input
from mipprune.pruning.graph import expected_input, find_prune_groups, is_prunable_module, prunable_layers
from solvers.errors import InvalidInputError, MipPruneError, UnsupportedLayerError
from solvers.selection.problem import SelectionProblem

# Accumulate CPU statistics with scipy BLAS (syrk/gemm into numpy); False: torch addmm_ everywhere
# (the CUDA path; a switch so that tests can exercise that path without a GPU).
CPU_BLAS = True

__all__ = ["LayerStatistics", "capture", "check_calibration_batch", "layer_generator", "layer_weights",
           "run_calibration_batch", "sample_conv_rows", "sample_positions"]


@dataclass
class LayerStatistics:
    """Sufficient statistics of one layer's least-squares reconstruction problem.

    Attributes
    ----------
    name : str
        Qualified module name.
    gram : float64 array (d, d)
        ``ZᵀZ``; ``d = in_channels·kh·kw`` (conv) or ``in_features`` (linear).
    cross : float64 array (d, m)
        ``ZᵀY`` with ``Y`` the layer's output without bias (or the target's, see :func:`capture`).
    target_sq : float
        ``‖Y‖²_F``.
    groups : int array (d,)
        Input channel of each column of ``Z``.
    weights : float64 array (d, m)
        The layer's current weights in the same layout (conv: ``weight.reshape(out, -1).T``;
        linear: ``weight.T``).
    n_samples : int
        Rows of ``Z`` accumulated (sampled positions × images, or linear rows).
    """

    name: str
    gram: np.ndarray
    cross: np.ndarray
    target_sq: float
    groups: np.ndarray
    weights: np.ndarray
    n_samples: int

    @property
    def n_channels(self) -> int:
        """``C``, the number of input channels (groups of columns)."""
        return int(self.groups.max()) + 1

    @property
    def columns_per_channel(self) -> int:
        """Columns of ``Z`` per input channel (``kh·kw`` for conv)."""
        return self.gram.shape[0] // self.n_channels

    def problem(self, costs=None) -> SelectionProblem:
        """The :class:`solvers.SelectionProblem` of these statistics (``costs``: (C,) per channel)."""
        return SelectionProblem(self.gram, self.cross, self.target_sq, self.groups, costs=costs,
                                weights=self.weights)


def layer_weights(module: nn.Module) -> np.ndarray:
    """The weights of a Conv2d / Linear as a float64 (d, m) array in the bridge layout."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).T.to(device="cpu", dtype=torch.float64).numpy().copy()


def layer_generator(name: str, seed: int = 0) -> torch.Generator:
    """The CPU generator that samples positions for layer ``name``: seeded by ``(seed, name)``, so a
    layer's sample does not depend on which other layers are captured, nor on the device."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _padded(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the conv pads it (any padding mode, ``padding='same'`` included)."""
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)


def sample_conv_rows(module: nn.Conv2d, x: torch.Tensor, positions: int | None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple | None]:
    """Unfolded input patches of a conv at sampled output positions.

    Parameters
    ----------
    module : nn.Conv2d (groups = 1)
    x : tensor (N, C_in, H, W)
        The conv's input.
    positions : int or None
        Output positions sampled per image, uniformly without replacement (all if ``None`` or if the
        map has fewer).
    generator : torch.Generator, optional
        CPU generator for the sampling (so the positions do not depend on the device).

    Returns
    -------
    Z : tensor (P, C_in·kh·kw)
        One row per sampled position, columns ordered as ``F.unfold`` orders them.
    index : (image, row, col) index tensors of length P, or ``None`` meaning every position in
        ``(image, row, col)`` order; ``out[image, :, row, col]`` are the matching outputs.
    """
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    xp = _padded(module, x)
    n, c, hp, wp = xp.shape
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    index = sample_positions(n, ho, wo, positions, generator, x.device)
    if index is None:
        cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # (N, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(n * ho * wo, c * kh * kw), None
    # a random subset of positions per image; gather only those patches (no full unfold in memory)
    img, oy, ox = index
    rows = oy[:, None] * sh + torch.arange(kh, device=x.device)[None, :] * dh       # (P, kh)
    colz = ox[:, None] * sw + torch.arange(kw, device=x.device)[None, :] * dw       # (P, kw)
    patches = xp[img[:, None, None], :, rows[:, :, None], colz[:, None, :]]         # (P, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(-1, c * kh * kw), (img, oy, ox)


def sample_positions(n: int, ho: int, wo: int, positions: int | None, generator: torch.Generator | None = None,
                     device=None) -> tuple | None:
    """The output positions :func:`sample_conv_rows` samples for ``n`` images of an ``ho×wo`` map:
    ``(image, row, col)`` index tensors (``positions`` per image, uniform without replacement), or
    ``None`` for every position (``positions`` is ``None`` or not below ``ho·wo``; the generator is
    then not drawn from). The same generator state gives the same positions for any layer of that
    output size (a dense layer and its pruned copy alike)."""
    if positions is None or positions >= ho * wo:
        return None
    scores = torch.rand(n, ho * wo, generator=generator)
    flat = scores.argsort(dim=1)[:, :positions].reshape(-1).to(device)
    img = torch.arange(n, device=device).repeat_interleave(positions)
    return img, flat // wo, flat % wo


_ROWS = 1024  # rows of Z converted to float64 and accumulated at a time
# Widest Gram accumulated by one SYRK: numpy's bundled OpenBLAS (0.3.31) crashes the process on
# multithreaded SYRKs with outputs past ~4 GB (d = 25,088: VGG's classifier at 224²); wider ones are
# accumulated in row blocks of GEMMs (solvers.selection.linalg explains).
_SYRK_MAX_COLUMNS = 16384


def _mirror_upper(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Copy the upper triangle of square ``a`` onto its lower one, in place, block by block
    (no d×d temporaries)."""
    d = a.shape[0]
    for i in range(0, d, block):
        j = min(i + block, d)
        a[j:, i:j] = a[i:j, j:].T
        diag = a[i:j, i:j]
        diag[...] = np.triu(diag) + np.triu(diag, 1).T
    return a


class _Accumulator:
    """Streaming G, B, ‖Y‖² of one layer (float64, on ``device``)."""

    def __init__(self, name: str, module: nn.Module, cols_per_channel: int, positions: int | None,
                 max_samples: int | None, seed: int, device: torch.device):
        self.name, self.module = name, module
        self.is_conv = isinstance(module, nn.Conv2d)
        w = module.weight
        self.d, self.m = w[0].numel(), w.shape[0]
        self.cols = cols_per_channel
        self.positions, self.max_samples = positions, max_samples
        self.bias = None if module.bias is None else module.bias.detach().to(device, torch.float64)
        # on CPU, BLAS syrk / gemm add into Fortran-ordered numpy accumulators in place (syrk does
        # half the flops of a general product and no d×d temporary); elsewhere torch addmm_
        self.on_cpu = CPU_BLAS and torch.device(device).type == "cpu"
        if self.on_cpu:
            self.G = np.zeros((self.d, self.d), order="F")  # upper triangle only, mirrored at the end
            self.B = np.zeros((self.d, self.m), order="F")
            self.yy = 0.0
        else:
            self.G = torch.zeros(self.d, self.d, dtype=torch.float64, device=device)
            self.B = torch.zeros(self.d, self.m, dtype=torch.float64, device=device)
            self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.gen = layer_generator(name, seed)
        self.pending: collections.deque = collections.deque()

    @property
    def full(self) -> bool:
        return self.max_samples is not None and self.n + self._reserved() >= self.max_samples

    def _reserved(self) -> int:
        return sum(p[0].shape[0] for p in self.pending if p is not None)

    def _rows(self, x: torch.Tensor):
        if self.is_conv:
            return sample_conv_rows(self.module, x, self.positions, self.gen)
        return x.reshape(-1, self.d), None

    def _outputs(self, out: torch.Tensor, index, n_rows: int, who: str,
                 expected_shape: tuple | None = None) -> torch.Tensor:
        """Output rows (without bias) matching the sampled input rows, float64."""
        if out.shape[1 if self.is_conv else -1] != self.m or (
                expected_shape is not None and tuple(out.shape) != expected_shape):
            want = expected_shape or f"{self.m} outputs"
            raise InvalidInputError(
                f"{who} layer {self.name!r} output must have shape {want} like the model's; got {tuple(out.shape)}")
        if self.is_conv:
            y = out.permute(0, 2, 3, 1).reshape(-1, self.m) if index is None else out[index[0], :, index[1], index[2]]
        else:
            y = out.reshape(-1, self.m)
        if y.shape[0] < n_rows:
            raise InvalidInputError(
                f"{who} layer {self.name!r} output must match the model's positions; got shape {tuple(out.shape)}")
        y = y[:n_rows].to(torch.float64)
        return y if self.bias is None else y - self.bias

    def on_input(self, x: torch.Tensor, out: torch.Tensor | None, with_target: bool) -> None:
        """``out``: the layer's output, or None when the targets come as recorded rows."""
        x = x.detach()  # data may be a leaf that requires grad
        out = None if out is None else out.detach()
        if self.full:
            if with_target:
                self.pending.append(None)
            return
        z, index = self._rows(x)
        if self.max_samples is not None:
            z = z[: self.max_samples - self.n - self._reserved()]
        if with_target:
            self.pending.append((z, index, None if out is None else tuple(out.shape)))
        else:
            self._add(z, self._outputs(out, index, z.shape[0], "model"))

    def on_target(self, out: torch.Tensor) -> None:
        if not self.pending:
            raise InvalidInputError(
                f"target must call layer {self.name!r} as often as model does; got an extra call")
        item = self.pending.popleft()
        out = out.detach()
        if item is not None:
            z, index, shape = item
            self._add(z, self._outputs(out, index, z.shape[0], "target", shape))

    def on_target_rows(self, rows: torch.Tensor | None, keep: torch.Tensor | None) -> None:
        """Like :meth:`on_target` for rows recorded beforehand at this layer's sampled positions
        (:func:`mipprune.pruning.streaming.record_target_rows`; ``None`` where the layer was full),
        restricted to the output channels ``keep``."""
        if not self.pending:
            raise InvalidInputError(f"target rows of layer {self.name!r} must match the model's calls; got an extra one")
        item = self.pending.popleft()
        if (item is None) != (rows is None):
            raise InvalidInputError(f"target rows of layer {self.name!r} must be sampled like the model's; got "
                                    f"{'none' if rows is None else 'rows'} where the model has "
                                    f"{'none' if item is None else 'rows'}")
        if item is None:
            return
        z = item[0]
        y = rows.to(self.bias.device if self.bias is not None else z.device)
        if keep is not None:
            y = y.index_select(1, keep.to(y.device))
        if y.shape[1] != self.m or y.shape[0] < z.shape[0]:
            raise InvalidInputError(f"target rows of layer {self.name!r} must have shape ({z.shape[0]}, {self.m}); "
                                    f"got {tuple(y.shape)}")
        y = y[: z.shape[0]].to(torch.float64)
        self._add(z, y if self.bias is None else y - self.bias)

    def end_batch(self) -> None:
        if self.pending:
            raise InvalidInputError(
                f"target must call layer {self.name!r} as often as model does; got {len(self.pending)} fewer calls")

    def _add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        # float64 copies are made a block of rows at a time: transient memory stays ~ _ROWS × d
        for i in range(0, z.shape[0], _ROWS):
            zb = z[i:i + _ROWS].to(torch.float64)
            yb = y[i:i + _ROWS]
            if self.on_cpu:
                zn = np.ascontiguousarray(zb.numpy())   # (n, d) C order: zn.T is Fortran, no copy
                yn = np.ascontiguousarray(yb.numpy())
                # re-assigned: f2py would copy instead of writing in place if the order were off
                if self.d <= _SYRK_MAX_COLUMNS:
                    self.G = blas.dsyrk(1.0, zn.T, beta=1.0, c=self.G, trans=0, overwrite_c=1)
                else:  # the upper triangle by row blocks (statistics() mirrors it)
                    for a in range(0, self.d, _ROWS):
                        b = min(a + _ROWS, self.d)
                        self.G[a:b, a:] += zn[:, a:b].T @ zn[:, a:]
                self.B = blas.dgemm(1.0, zn.T, yn.T, beta=1.0, c=self.B, trans_b=1, overwrite_c=1)
                self.yy += float(np.einsum("ij,ij->", yn, yn))
            else:
                self.G.addmm_(zb.T, zb)
                self.B.addmm_(zb.T, yb)
                self.yy += (yb * yb).sum()
        self.n += z.shape[0]

    def statistics(self) -> LayerStatistics:
        c = self.d // self.cols
        if self.on_cpu:
            gram = _mirror_upper(self.G).T  # symmetric, so the C-ordered view is the same matrix
            cross = np.ascontiguousarray(self.B)
        else:
            gram, cross = self.G.cpu().numpy(), self.B.cpu().numpy()
        return LayerStatistics(
            name=self.name, gram=gram, cross=cross,
            target_sq=float(self.yy), groups=np.repeat(np.arange(c), self.cols),
            weights=layer_weights(self.module), n_samples=self.n)


def _batch_input(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) > 0 else batch
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(
            "each batch must be a tensor or a tuple/list whose first item is the input tensor; "
            f"got {type(batch).__name__}" + (f" of {type(x).__name__}" if x is not batch else ""))
    return x


def check_calibration_batch(x: torch.Tensor, index: int) -> None:
    """Raise ``InvalidInputError`` when calibration batch ``index`` holds NaN or inf."""
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise InvalidInputError(f"calibration data contains NaN/inf: batch {index} (shape {tuple(x.shape)}) "
                                    f"has {bad} non-finite entr{'y' if bad == 1 else 'ies'}")


def run_calibration_batch(model: nn.Module, x: torch.Tensor, index: int, device=None, *, probe: bool = False):
    """``model(x)`` for calibration batch ``index``, its failures told in the user's terms
    (``probe``: check all of ``x`` but run only its first sample)."""
    check_calibration_batch(x, index)
    try:
        return model(prepare_input(model, x[:1] if probe else x, device))
    except MipPruneError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # the user's model rejected the batch (usually its shape)
        raise InvalidInputError(
            f"calibration batch {index} has shape {tuple(x.shape)}; the model expects {expected_input(model)}. "
            f"The forward raised {type(exc).__name__}: {exc}") from exc


def _check_count(name: str, value, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}; got {value!r}")
    return int(value)


def _resolve_layers(model: nn.Module, layers) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        # every Conv2d / Linear the forward calls; grouped convs are skipped (not selectable)
        return [n for n in prunable_layers(model)
                if not (isinstance(modules[n], nn.Conv2d) and modules[n].groups != 1)]
    if isinstance(layers, str):
        layers = [layers]
    names = list(dict.fromkeys(layers))
    if not names:
        raise InvalidInputError("layers must name at least one nn.Conv2d / nn.Linear module; got none")
    for n in names:
        if n not in modules or n == "":
            raise InvalidInputError(f"layers must be module names of the model; got {n!r} (no such module)")
        m = modules[n]
        if not is_prunable_module(m):
            raise UnsupportedLayerError(f"layer {n!r} must be nn.Conv2d or nn.Linear; got {type(m).__name__}")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise UnsupportedLayerError(f"layer {n!r} groups must be 1; got {m.groups}")
    return names


def _resolve_columns(model: nn.Module, names: list[str], given: Mapping[str, int] | None,
                     example: torch.Tensor) -> dict[str, int]:
    modules = dict(model.named_modules())
    given = dict(given or {})
    for n, v in given.items():
        if n not in names:
            raise InvalidInputError(f"columns_per_channel must name captured layers; got {n!r}")
        _check_count(f"columns_per_channel[{n!r}]", v, allow_none=False)
    cols: dict[str, int] = {}
    need_trace = [n for n in names if isinstance(modules[n], nn.Linear) and n not in given]
    traced: dict[str, int] = {}
    if need_trace:
        try:
            traced = {g.consumer: g.columns_per_channel for g in find_prune_groups(model, example)}
        except UnsupportedLayerError as exc:
            warnings.warn(f"could not trace the model ({exc}); Linear layers get 1 column per channel",
                          stacklevel=3)
    for n in names:
        m = modules[n]
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            if n in given and int(given[n]) != k:
                raise InvalidInputError(f"columns_per_channel[{n!r}] must be kh*kw = {k} for a conv; got {given[n]}")
            cols[n] = k
        else:
            c = int(given.get(n, traced.get(n, 1)))
            if m.in_features % c:
                raise InvalidInputError(
                    f"columns_per_channel[{n!r}] must divide in_features = {m.in_features}; got {c}")
            cols[n] = c
    return cols


def capture(model: nn.Module, data: Iterable, layers: Iterable[str] | str | None = None, *,
            device: str | torch.device | None = None, positions: int | None = 10,
            max_samples: int | None = None, target: nn.Module | None = None,
            columns_per_channel: Mapping[str, int] | None = None, seed: int = 0,
            progress: bool = False, target_channels: Mapping[str, Any] | None = None,
            forward=None, target_rows: Mapping[str, list] | None = None) -> dict[str, LayerStatistics]:
    """Stream calibration data through ``model`` and return per-layer Gram statistics.

    Parameters
    ----------
    model : nn.Module
        Left untouched: it runs in eval mode under ``torch.no_grad`` and every module's mode is
        restored afterwards; the hooks are removed even if the forward fails.
    data : iterable of batches
        Each batch a tensor or a tuple/list whose first item is the input (a ``DataLoader`` works).
        Inputs are moved to the model's device and cast to its floating dtype.
    layers : names of nn.Conv2d / nn.Linear modules, optional
        Default: every one the forward calls, except grouped convolutions.
    device : optional
        Run a *copy* of the model (and of ``target``) on this device. Default: the model's device;
        the statistics are accumulated there (on the GPU for a CUDA model).
    positions : int or None
        Conv output positions sampled per image (uniform, without replacement; ``None`` = all).
    max_samples : int, optional
        Cap on the rows of ``Z`` per layer; data stops being read once every layer has its cap.
    target : nn.Module, optional
        A second model with the same layer names whose layer *outputs* give ``Y`` while ``Z`` still
        comes from ``model`` (He et al.: inputs from the pruned prefix, outputs from the dense
        network). Both run on the same batches; ``Y`` is the target layer's output minus *this*
        model's layer bias, so that ``Z W + bias`` reconstructs the target's output.
    columns_per_channel : {layer name: int}, optional
        Columns per input channel of Linear layers fed by a flattened conv map (``H·W``). Default:
        from :func:`mipprune.pruning.graph.find_prune_groups` on the first batch, else 1.
    seed : int
        Seed of the position sampling (per layer, independent of which layers are captured).
    progress : bool
        Show a rich progress bar over batches.
    target_channels : {layer name: int indices}, optional
        With ``target``: the target layer's output channels that the model's layer still has (the
        model's outputs pruned, the target's not); ``Y`` is the target's output at these channels.
        The same with ``target_rows``.
    forward : callable ``(index, x) -> None``, optional
        Runs ``model`` on calibration batch ``index`` (input ``x``, unprepared) far enough for the
        layers' hooks to fire, e.g. a truncated forward from cached activations
        (:class:`mipprune.pruning.streaming.CachedForward`). Default: ``model(x)``. Not with ``device``.
    target_rows : {layer name: per-batch lists of tensors}, optional
        Instead of running ``target``: for every batch, one entry per call of the layer, the target
        layer's output rows at the positions this capture samples (``None`` once the layer is full),
        recorded by :func:`mipprune.pruning.streaming.record_target_rows`. Not with ``target``.

    Returns
    -------
    dict {layer name: LayerStatistics}, in the order of ``layers``.

    Raises
    ------
    InvalidInputError
        Empty ``data``, a batch without an input tensor, a missing layer name, bad options.
    UnsupportedLayerError
        A requested layer that is not Conv2d / Linear, or a grouped convolution.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if target is not None and not isinstance(target, nn.Module):
        raise InvalidInputError(f"target must be a torch.nn.Module or None; got {type(target).__name__}")
    positions = _check_count("positions", positions)
    max_samples = _check_count("max_samples", max_samples)
    names = _resolve_layers(model, layers)
    if not names:
        raise InvalidInputError("model must contain an nn.Conv2d or nn.Linear to capture; got none")
    if target is not None:
        tmods = dict(target.named_modules())
        for n in names:
            if n not in tmods or not is_prunable_module(tmods[n]):
                raise InvalidInputError(f"target must have a Conv2d/Linear named {n!r} like model; got none")

    if target_rows is not None:
        if target is not None:
            raise InvalidInputError("target and target_rows must not both be given; got both")
        missing = [n for n in names if n not in target_rows]
        if missing:
            raise InvalidInputError(f"target_rows must hold every captured layer; got none for {missing}")
    if forward is not None and device is not None:
        raise InvalidInputError("forward runs the model itself: device must be None with it; got "
                                f"device={device!r}")

    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise InvalidInputError("data must yield at least one batch; got none")

    if device is not None:
        device = torch.device(device)
        work = copy.deepcopy(model).to(device)
        work_target = None if target is None else copy.deepcopy(target).to(device)
    else:
        work, device = model, model_device(model)
        work_target = target
        if target is not None and model_device(target) != device:
            work_target = copy.deepcopy(target).to(device)

    cols = _resolve_columns(work, names, columns_per_channel, _batch_input(first))
    wmods = dict(work.named_modules())
    accs = {n: _Accumulator(n, wmods[n], cols[n], positions, max_samples, seed, device) for n in names}
    with_target = work_target is not None or target_rows is not None
    keeps = {n: None if (target_channels or {}).get(n) is None else
             torch.as_tensor(target_channels[n], dtype=torch.long) for n in names}

    handles = []
    try:
        for n, acc in accs.items():
            if target_rows is not None:
                # Y is recorded: only the layer's input is read, before it runs (a forward that stops
                # there, CachedForward.runner(skip_last=True), saves the last consumer's own cost)
                handles.append(wmods[n].register_forward_pre_hook(
                    lambda _m, inp, acc=acc: acc.on_input(inp[0], None, True)))
                continue
            handles.append(wmods[n].register_forward_hook(
                lambda _m, inp, out, acc=acc: acc.on_input(inp[0], out, with_target)))
        if work_target is not None:
            tmods = dict(work_target.named_modules())
            for n, acc in accs.items():
                keep = (target_channels or {}).get(n)
                keep = None if keep is None else torch.as_tensor(keep, dtype=torch.long, device=device)
                # a target layer with more outputs than the model's (its outputs pruned already): the
                # kept ones, so that Y matches the model's layer
                handles.append(tmods[n].register_forward_hook(
                    lambda _m, _i, out, acc=acc, keep=keep: acc.on_target(
                        out if keep is None else out.index_select(1 if acc.is_conv else out.ndim - 1, keep))))
        with evaluation_mode(work, work_target), _progress(progress, data) as advance:
            for index, batch in enumerate(itertools.chain([first], iterator)):
                x = _batch_input(batch)
                if forward is None:
                    run_calibration_batch(work, x, index, device)
                else:
                    check_calibration_batch(x, index)
                    forward(index, x)
                if work_target is not None:
                    work_target(prepare_input(work_target, x, device))
                elif target_rows is not None:
                    for n, acc in accs.items():
                        calls = target_rows[n][index] if index < len(target_rows[n]) else []
                        for rows in calls:
                            acc.on_target_rows(rows, keeps[n])
                for acc in accs.values():
                    acc.end_batch()
                advance()
                if max_samples is not None and all(a.n >= max_samples for a in accs.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    for n, acc in accs.items():
        if acc.n == 0:
            raise InvalidInputError(f"layer {n!r} must be called by the model's forward; got no calls")
    stats = {n: acc.statistics() for n, acc in accs.items()}
    for n, st in stats.items():   # finite inputs (checked per batch), yet the model overflowed inside
        if not (np.isfinite(st.target_sq) and np.isfinite(st.gram).all() and np.isfinite(st.cross).all()):
            raise InvalidInputError(f"calibration data must give finite activations; got NaN/inf at layer {n!r} "
                                    "(the inputs are finite: the model overflows on them)")
    return stats


class _progress:
    """Context manager yielding an ``advance()`` callable (a rich bar when enabled, else a no-op)."""

    def __init__(self, enabled: bool, data):
        self.enabled = enabled
        self.total = len(data) if enabled and hasattr(data, "__len__") else None
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("capturing statistics", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
