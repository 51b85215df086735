"""A small numpy IR for ReLU networks (the only thing the verification code sees): Dense, Conv2d,
Flatten, Normalize, AvgPool2d, MaxPool2d, ReLU, and for residual networks Add (the latest activation
plus an earlier one) and Branch (continue from an earlier activation, e.g. a downsampling shortcut).

Layers act on one sample's tensor; shapes exclude the batch axis. ``Network.forward`` is the float64
reference forward used to re-check every counterexample. ``Network.to_affine_relu()`` folds the
network into affine blocks, each followed by a ReLU or a max pool, whose affine maps may also read
earlier activations (the residual skips): the form the bound and MILP code works on.

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
from solvers.network.layers import (LAYER_TYPES, Add, AffineBlock, Branch, Conv2d, ConvGeometry, Dense, Flatten,
                                     MaxPool2d, Normalize, ReLU, Shape, check_layer_finite, is_plain)


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
            if not isinstance(layer, LAYER_TYPES):
                raise UnsupportedLayerError(f"layer {i} must be one of "
                                            f"{', '.join(t.__name__ for t in LAYER_TYPES)}; got {type(layer).__name__}")
            if isinstance(layer, Add):
                if not 0 <= layer.source <= i or shapes[layer.source] != shapes[-1]:
                    raise InvalidInputError(
                        f"Add at layer {i} must reference an earlier activation of shape {shapes[-1]}; "
                        f"got source {layer.source}")
            if isinstance(layer, Branch):
                if not 0 <= layer.source <= i:
                    raise InvalidInputError(f"Branch at layer {i} must reference an earlier activation "
                                            f"(0 … {i}); got source {layer.source}")
                shapes.append(tuple(shapes[layer.source]))
                continue
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
            elif isinstance(layer, Branch):
                acts.append(acts[layer.source])
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
        """Fold into blocks ``[A_0, A_1, …, A_L]``: ``z_i = A_i(h_i, earlier h_k)``, ``h_{i+1} = ReLU(z_i)``
        (or a max pool, :class:`AffineBlock`), output ``z_L``; ``h_0`` is the input.

        Consecutive affine layers (AvgPool2d included) are composed; a residual ``Add`` becomes the sum
        of both operands' affine expressions, which may read earlier activations ``h_k`` (the block's
        ``skips``); a network ending in ReLU or MaxPool2d gets an identity last block.
        """
        # every activation as an affine expression of materialized h_k: ({k: CSR}, bias, k if it is h_k,
        # the ConvGeometry if it is exactly one convolution of the latest h_k)
        eye = lambda n: sp.identity(n, format="csr")  # noqa: E731
        exprs = [({0: eye(self.n_inputs)}, np.zeros(self.n_inputs), 0, None)]
        blocks: list[AffineBlock] = []
        relu_h: set[int] = set()   # h_k that are ReLU outputs (a second ReLU on them is the identity)

        def materialize(expr, pool=None) -> AffineBlock:
            terms, bias, _, conv = expr
            i = len(blocks)
            n = bias.size
            W = terms.get(i, sp.csr_matrix((n, blocks[-1].n_act if blocks else self.n_inputs)))
            skips = tuple((k, M.tocsr()) for k, M in sorted(terms.items()) if k != i)
            conv = conv if set(terms) == {i} else None   # the whole weight, no skips
            blk = AffineBlock(W.tocsr(), bias.copy(), skips, pool, conv)
            for M in [blk.weight] + [M for _, M in skips]:
                M.eliminate_zeros()
            return blk

        for i, layer in enumerate(self.layers):
            shape = self.shapes[i]
            cur = exprs[-1]
            if isinstance(layer, Branch):
                exprs.append(exprs[layer.source])
            elif isinstance(layer, Add):
                terms = dict(cur[0])
                for k, M in exprs[layer.source][0].items():
                    terms[k] = (terms[k] + M).tocsr() if k in terms else M
                exprs.append((terms, cur[1] + exprs[layer.source][1], None, None))
            elif isinstance(layer, (ReLU, MaxPool2d)):
                if isinstance(layer, ReLU) and cur[2] in relu_h:
                    exprs.append(cur)
                    continue
                pool = layer.windows(shape) if isinstance(layer, MaxPool2d) else None
                blocks.append(materialize(cur, pool))
                k = len(blocks)
                if pool is None:
                    relu_h.add(k)
                n = blocks[-1].n_act
                exprs.append(({k: eye(n)}, np.zeros(n), k, None))
            else:
                W, b = layer.as_matrix(shape)
                W = sp.csr_matrix(W)
                # a convolution straight on a materialized h_k keeps its geometry (fast products)
                conv = ConvGeometry.of(layer, shape) if isinstance(layer, Conv2d) and cur[2] is not None else None
                exprs.append(({k: (W @ M).tocsr() for k, M in cur[0].items()}, W @ cur[1] + b, None, conv))
        blocks.append(materialize(exprs[-1]))
        return blocks

    @classmethod
    def from_onnx(cls, path) -> "Network":
        """Read an ONNX file (see :mod:`solvers.network.onnx` for the supported operators)."""
        layers, input_shape, names = read_onnx(path)
        return cls(layers, input_shape, names=names)


def forward_blocks(blocks: Sequence[AffineBlock], X) -> np.ndarray:
    """Float64 forward of the verification form: ``X`` (N, n_inputs) → (N, n_outputs)."""
    hs = [np.asarray(X, dtype=np.float64)]
    for i, blk in enumerate(blocks):
        z = sum(np.asarray(W @ hs[k].T).T for k, W in blk.terms(i)) + blk.bias
        if i == len(blocks) - 1:
            return z
        hs.append(np.maximum(z, 0.0) if blk.pool is None else z[:, blk.pool].max(axis=-1))


def network_from_blocks(blocks: Sequence[AffineBlock], input_shape: Shape | None = None) -> Network:
    """Inverse of :meth:`Network.to_affine_relu` (Dense + ReLU layers); handy in tests."""
    if not is_plain(blocks):
        raise InvalidInputError("network_from_blocks needs plain affine/ReLU blocks (no skips, no max pooling)")
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
