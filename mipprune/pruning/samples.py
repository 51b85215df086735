"""Calibration samples of one layer kept as rows (``Z`` n×d, ``Y`` n×m) instead of its Gram.

When a layer sees fewer calibration rows than it has input columns (``n < d``: a wide 3×3 conv or a
classifier on a flattened map, a short calibration), ``G = ZᵀZ`` (d×d) is larger than ``Z`` and of
rank ≤ n. :func:`capture_samples` keeps the rows, sampled exactly as
:func:`mipprune.pruning.bridge.capture` samples them (same positions, same seed per layer), and
:class:`LayerSamples` hands out the blocks of ``G`` and ``B = ZᵀY`` that a selection needs, each
computed in pieces by :func:`chunked_product` (no single product over ``MAX_PRODUCT_BYTES``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mipprune.pruning.bridge import (LayerStatistics, _batch_input, layer_generator, layer_weights,
                                     run_calibration_batch, sample_conv_rows)
from mipprune.torch_utils import evaluation_mode, model_device, prepare_input
from solvers.errors import InvalidInputError
from solvers.selection.linalg import MAX_PRODUCT_BYTES, chunked_product

__all__ = ["MAX_PRODUCT_BYTES", "LayerSamples", "capture_samples", "chunked_product"]


@dataclass
class LayerSamples:
    """Rows of one layer's least-squares problem (float64): ``Z`` (n, d), ``Y`` (n, m) without bias,
    ``‖Y‖²``, the input channel of each column (``groups``), the layer's weights (d, m) and ``n``."""

    name: str
    Z: np.ndarray
    Y: np.ndarray
    target_sq: float
    groups: np.ndarray
    weights: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.Z.shape[0])

    def gram_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``G[rows, cols] = Z[:, rows]ᵀ Z[:, cols]`` (chunked)."""
        return chunked_product(self.Z[:, rows], self.Z[:, cols], transpose_a=True)

    def cross_block(self, rows: np.ndarray) -> np.ndarray:
        """``B[rows] = Z[:, rows]ᵀ Y``."""
        return chunked_product(self.Z[:, rows], self.Y, transpose_a=True)

    def statistics(self) -> LayerStatistics:
        """The Gram statistics of these rows (d×d: only where that is what a caller needs)."""
        every = np.arange(self.Z.shape[1])
        return LayerStatistics(name=self.name, gram=self.gram_block(every, every), cross=self.cross_block(every),
                               target_sq=self.target_sq, groups=self.groups, weights=self.weights,
                               n_samples=self.n_samples)


def capture_samples(model: nn.Module, data: Iterable, name: str, *, positions: int | None = 10,
                    max_samples: int | None = None, seed: int = 0, target: nn.Module | None = None,
                    target_channels: Mapping[str, np.ndarray] | None = None, columns_per_channel: int = 1
                    ) -> LayerSamples:
    """The rows of ``Z`` and ``Y`` of Conv2d / Linear ``name`` that :func:`mipprune.pruning.bridge.capture`
    would accumulate into its Gram (same arguments; one layer; ``model`` and ``target`` on one device)."""
    mods = dict(model.named_modules())
    module = mods.get(name)
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise InvalidInputError(f"layer must name a Conv2d/Linear of the model; got {name!r}")
    is_conv = isinstance(module, nn.Conv2d)
    device = model_device(model)
    gen = layer_generator(name, seed)
    bias = None if module.bias is None else module.bias.detach().to(device, torch.float64)
    m = module.weight.shape[0]
    keep = (target_channels or {}).get(name)
    keep = None if keep is None else torch.as_tensor(keep, dtype=torch.long, device=device)
    zs, ys, seen = [], [], {}
    n = 0

    def on_input(_m, inp, out):
        if max_samples is not None and n >= max_samples:
            seen["skip"] = True
            return
        x = inp[0].detach()
        z, index = sample_conv_rows(module, x, positions, gen) if is_conv else (x.reshape(-1, x.shape[-1]), None)
        if max_samples is not None:
            z = z[: max_samples - n]
        seen.update(z=z, index=index, out=out.detach(), skip=False)

    def rows_of(out, index, count):
        if is_conv:
            y = (out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]) if index is None
                 else out[index[0], :, index[1], index[2]])
        else:
            y = out.reshape(-1, out.shape[-1])
        return y[:count].to(torch.float64)

    handles = [module.register_forward_hook(on_input)]
    if target is not None:
        tmod = dict(target.named_modules())[name]
        handles.append(tmod.register_forward_hook(lambda _m, _i, out: seen.update(target_out=out.detach())))
    try:
        with evaluation_mode(model, target):
            for index, batch in enumerate(data):
                x = _batch_input(batch)
                seen.clear()
                run_calibration_batch(model, x, index, device)
                if target is not None:
                    target(prepare_input(target, x, device))
                if "z" not in seen or seen.get("skip"):
                    if max_samples is not None and n >= max_samples:
                        break
                    continue
                z = seen["z"]
                out = seen["out"] if target is None else seen["target_out"]
                if target is not None and keep is not None:
                    out = out.index_select(1 if is_conv else out.ndim - 1, keep)
                if out.shape[1 if is_conv else -1] != m:
                    raise InvalidInputError(f"target layer {name!r} output must have {m} channels like the model's; "
                                            f"got {tuple(out.shape)}")
                y = rows_of(out, seen["index"], z.shape[0])
                zs.append(z.to(torch.float64).cpu().numpy())
                ys.append((y if bias is None else y - bias).cpu().numpy())
                n += z.shape[0]
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise InvalidInputError(f"layer {name!r} must be called by the model's forward; got no calls")
    Z, Y = np.concatenate(zs), np.concatenate(ys)
    d = Z.shape[1]
    return LayerSamples(name=name, Z=Z, Y=Y, target_sq=float(np.einsum("ij,ij->", Y, Y)),
                        groups=np.repeat(np.arange(d // columns_per_channel), columns_per_channel),
                        weights=layer_weights(module))

