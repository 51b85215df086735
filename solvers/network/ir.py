"""A small numpy IR for feed-forward ReLU networks (the only thing the verification code sees).

Layers act on one sample's tensor; shapes exclude the batch axis. ``Network.forward`` is the float64
reference forward used to re-check every counterexample. ``Network.to_affine_relu()`` folds the
network into alternating affine maps and ReLUs, the form the bound and MILP code works on.

Layers live in :mod:`solvers.network.layers`; ONNX import in :mod:`solvers.network.onnx`, exposed as
``Network.from_onnx``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from solvers.errors import InvalidInputError, UnsupportedLayerError
from solvers.network.onnx import read_onnx
from solvers.network.layers import (Add, AffineBlock, Conv2d, Dense, Flatten, Normalize, ReLU, Shape,
                                     check_layer_finite)


@dataclass(eq=False)
class Network:
    """A feed-forward network: ``layers`` applied in order to inputs of shape ``input_shape``."""

    layers: list
    input_shape: Shape
    names: list = field(default_factory=list)

    def __post_init__(self):
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.layers = list(self.layers)
        if not self.names:
            self.names = [f"{type(l).__name__.lower()}_{i}" for i, l in enumerate(self.layers)]
        self.shapes = self._propagate_shapes()

    def _propagate_shapes(self) -> list[Shape]:
        self.check_finite()
        shapes = [self.input_shape]
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, (Dense, Conv2d, ReLU, Flatten, Normalize, Add)):
                raise UnsupportedLayerError(f"layer {i} must be one of Dense, Conv2d, ReLU, Flatten, "
                                            f"Normalize, Add; got {type(layer).__name__}")
            if isinstance(layer, Add):
                if not 0 <= layer.source <= i or shapes[layer.source] != shapes[-1]:
                    raise InvalidInputError(
                        f"Add at layer {i} must reference an earlier activation of shape {shapes[-1]}; "
                        f"got source {layer.source}")
            shapes.append(layer.output_shape(shapes[-1]))
        return shapes

    def check_finite(self) -> None:
        """Re-check that every layer's weights, biases and normalization constants are finite
        (``InvalidInputError`` naming the layer otherwise): the arrays are plain attributes and may
        have been changed since the network was assembled. Cheap (one pass over the parameters)."""
        for i, layer in enumerate(self.layers):
            check_layer_finite(i, layer, self.names[i] if i < len(self.names) else None)

    # ------------------------------------------------------------------ sizes
    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def output_shape(self) -> Shape:
        return self.shapes[-1]

    @property
    def n_outputs(self) -> int:
        return int(np.prod(self.output_shape))

    def __repr__(self) -> str:
        body = ", ".join(type(l).__name__ for l in self.layers)
        return f"Network(input_shape={self.input_shape}, layers=[{body}])"

    # ------------------------------------------------------------------ forward
    def _batch(self, x) -> tuple[np.ndarray, bool]:
        x = np.asarray(x, dtype=np.float64)
        if x.shape == self.input_shape or (x.ndim == 1 and x.size == self.n_inputs):
            return x.reshape((1,) + self.input_shape), False
        if x.shape[1:] == self.input_shape:
            return x, True
        if x.ndim == 2 and x.shape[1] == self.n_inputs:
            return x.reshape((x.shape[0],) + self.input_shape), True
        raise InvalidInputError(f"input must have shape (N, *{self.input_shape}), {self.input_shape} or "
                                f"(N, {self.n_inputs}); got {x.shape}")

    def activations(self, x) -> list[np.ndarray]:
        """All activations, batched: ``[input, output of layer 0, …]`` (float64)."""
        xb, _ = self._batch(x)
        acts = [xb]
        for layer in self.layers:
            if isinstance(layer, Add):
                acts.append(acts[-1] + acts[layer.source])
            else:
                acts.append(layer.forward(acts[-1]))
        return acts

    def forward(self, x) -> np.ndarray:
        """Float64 forward. ``x``: (N, *input_shape), (N, n_inputs) or one sample; output (N, n_outputs)
        for a batch, (n_outputs,) for one sample."""
        xb, batched = self._batch(x)
        out = self.activations(xb)[-1].reshape(xb.shape[0], -1)
        return out if batched else out[0]

    __call__ = forward

    # ------------------------------------------------------------------ verification form
    def to_affine_relu(self) -> list[AffineBlock]:
        """Fold into ``[A_0, A_1, …, A_L]`` with ``x_{i+1} = ReLU(A_i x_i)`` and output ``A_L x_L``.

        Consecutive affine layers are composed; a network ending in ReLU gets an identity last block.
        Residual ``Add`` layers are not expressible in this form and raise ``UnsupportedLayerError``.
        """
        blocks: list[AffineBlock] = []
        cur: AffineBlock | None = None
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Add):
                raise UnsupportedLayerError(
                    f"layer {i} ({self.names[i]}): the verifier (bounds, MILP, branch and bound) needs a "
                    "feed-forward affine/ReLU network; got a residual Add (from layer "
                    f"{layer.source}), which Network.from_onnx reads and Network.forward runs, but which "
                    "cannot be verified yet")
            if isinstance(layer, ReLU):
                if cur is None:
                    if blocks:   # ReLU after ReLU is idempotent
                        shape = layer.output_shape(shape)
                        continue
                    n = int(np.prod(shape))
                    cur = AffineBlock(sp.identity(n, format="csr"), np.zeros(n))
                blocks.append(cur)
                cur = None
            else:
                W, b = layer.as_matrix(shape)
                if cur is None:
                    cur = AffineBlock(W.tocsr(), b)
                else:
                    cur = AffineBlock((W @ cur.weight).tocsr(), W @ cur.bias + b)
            shape = layer.output_shape(shape)
        if cur is None:
            n = int(np.prod(shape))
            cur = AffineBlock(sp.identity(n, format="csr"), np.zeros(n))
        blocks.append(cur)
        for blk in blocks:
            blk.weight.eliminate_zeros()
        return blocks

    @classmethod
    def from_onnx(cls, path) -> "Network":
        """Read an ONNX file (see :mod:`solvers.network.onnx` for the supported operators)."""
        layers, input_shape, names = read_onnx(path)
        return cls(layers, input_shape, names=names)


def network_from_blocks(blocks: Sequence[AffineBlock], input_shape: Shape | None = None) -> Network:
    """Inverse of :meth:`Network.to_affine_relu` (Dense + ReLU layers); handy in tests."""
    layers: list = []
    for i, blk in enumerate(blocks):
        layers.append(Dense(blk.dense(), blk.bias))
        if i < len(blocks) - 1:
            layers.append(ReLU())
    return Network(layers, input_shape or (blocks[0].shape[1],))


def as_blocks(network) -> list[AffineBlock]:
    """The affine/ReLU blocks of a :class:`Network` (or a list of blocks, passed through)."""
    if isinstance(network, Network):
        return network.to_affine_relu()
    if isinstance(network, (list, tuple)) and network and all(isinstance(b, AffineBlock) for b in network):
        return list(network)
    raise InvalidInputError(f"network must be a solvers.Network or a list of AffineBlock; got {type(network).__name__}")
