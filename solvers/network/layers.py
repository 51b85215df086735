"""The layers of the numpy network IR (one sample's tensor; shapes exclude the batch axis), the
finiteness checks run whenever layers are built or folded, and the affine block the bound and MILP
code work on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.sparse as sp

from solvers.errors import InvalidInputError

Shape = tuple[int, ...]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def require_finite(name: str, a, hint: str = "") -> np.ndarray:
    """``a`` as a float64 array, or ``InvalidInputError`` "{name} must be finite; got N NaN/inf entries{hint}"."""
    arr = np.asarray(a, dtype=np.float64)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InvalidInputError(f"{name} must be finite; got {bad} NaN/inf entries{hint}")
    return arr


@dataclass(eq=False)
class Dense:
    """``y = W x + b``; ``weight`` (out, in), ``bias`` (out,)."""

    weight: np.ndarray
    bias: np.ndarray | None = None

    def __post_init__(self):
        self.weight = require_finite("Dense.weight", self.weight)
        if self.weight.ndim != 2:
            raise InvalidInputError(f"Dense.weight must be 2-D (out, in); got shape {self.weight.shape}")
        self.bias = np.zeros(self.weight.shape[0]) if self.bias is None else require_finite("Dense.bias", self.bias).reshape(-1)
        if self.bias.shape != (self.weight.shape[0],):
            raise InvalidInputError(f"Dense.bias must have shape ({self.weight.shape[0]},); got {self.bias.shape}")

    def output_shape(self, in_shape: Shape) -> Shape:
        if int(np.prod(in_shape)) != self.weight.shape[1] or len(in_shape) != 1:
            raise InvalidInputError(f"Dense layer expects input shape ({self.weight.shape[1]},); got {in_shape}")
        return (self.weight.shape[0],)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def as_matrix(self, in_shape: Shape) -> tuple[sp.csr_matrix, np.ndarray]:
        return sp.csr_matrix(self.weight), self.bias.copy()


@dataclass(eq=False)
class Conv2d:
    """2-D convolution on (C, H, W); ``weight`` (out, in, kh, kw), symmetric zero ``padding``."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self):
        self.weight = require_finite("Conv2d.weight", self.weight)
        if self.weight.ndim != 4:
            raise InvalidInputError(f"Conv2d.weight must be 4-D (out, in, kh, kw); got shape {self.weight.shape}")
        self.bias = np.zeros(self.weight.shape[0]) if self.bias is None else require_finite("Conv2d.bias", self.bias).reshape(-1)
        self.stride, self.padding, self.dilation = _pair(self.stride), _pair(self.padding), _pair(self.dilation)

    def output_shape(self, in_shape: Shape) -> Shape:
        out, cin, kh, kw = self.weight.shape
        if len(in_shape) != 3 or in_shape[0] != cin:
            raise InvalidInputError(f"Conv2d layer expects input shape ({cin}, H, W); got {in_shape}")
        _, H, W = in_shape
        oh = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if oh <= 0 or ow <= 0:
            raise InvalidInputError(f"Conv2d output would be empty for input shape {in_shape}")
        return (out, oh, ow)

    def forward(self, x: np.ndarray) -> np.ndarray:
        out, cin, kh, kw = self.weight.shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        _, oh, ow = self.output_shape(x.shape[1:])
        # windows: (N, C, oh, ow, kh, kw) gathered with strides (no copy until einsum)
        win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw, ::dh, ::dw]
        return np.einsum("ncpqij,ocij->nopq", win, self.weight, optimize=True) + self.bias[None, :, None, None]

    def as_matrix(self, in_shape: Shape) -> tuple[sp.csr_matrix, np.ndarray]:
        """The convolution as a sparse (out·oh·ow) × (in·H·W) matrix and the bias per output."""
        out, cin, kh, kw = self.weight.shape
        _, H, W = in_shape
        _, oh, ow = self.output_shape(in_shape)
        o, p, q, c, i, j = np.meshgrid(np.arange(out), np.arange(oh), np.arange(ow), np.arange(cin),
                                       np.arange(kh), np.arange(kw), indexing="ij")
        r = p * self.stride[0] - self.padding[0] + i * self.dilation[0]
        s = q * self.stride[1] - self.padding[1] + j * self.dilation[1]
        ok = (r >= 0) & (r < H) & (s >= 0) & (s < W) & (self.weight[o, c, i, j] != 0)
        rows = ((o * oh + p) * ow + q)[ok]
        cols = ((c * H + r) * W + s)[ok]
        vals = self.weight[o, c, i, j][ok]
        M = sp.csr_matrix((vals, (rows, cols)), shape=(out * oh * ow, cin * H * W))
        return M, np.repeat(self.bias, oh * ow)


@dataclass(eq=False)
class ReLU:
    """Element-wise ``max(0, x)``."""

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)


@dataclass(eq=False)
class Flatten:
    """Row-major flattening of one sample's tensor (as torch and ONNX do)."""

    def output_shape(self, in_shape: Shape) -> Shape:
        return (int(np.prod(in_shape)),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1)

    def as_matrix(self, in_shape: Shape) -> tuple[sp.csr_matrix, np.ndarray]:
        n = int(np.prod(in_shape))
        return sp.identity(n, format="csr"), np.zeros(n)


@dataclass(eq=False)
class Normalize:
    """Input scaling ``(x − mean) / std``; ``mean`` and ``std`` broadcast against one sample's shape."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        self.mean = require_finite("Normalize.mean", self.mean)
        self.std = require_finite("Normalize.std", self.std)
        if np.any(self.std == 0):
            raise InvalidInputError("Normalize.std must be non-zero; got a zero entry")

    def output_shape(self, in_shape: Shape) -> Shape:
        try:
            np.broadcast_shapes(tuple(in_shape), self.mean.shape, self.std.shape)
        except ValueError:
            raise InvalidInputError(f"Normalize mean/std shapes {self.mean.shape}/{self.std.shape} do not "
                                    f"broadcast to the input shape {in_shape}") from None
        return tuple(in_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def as_matrix(self, in_shape: Shape) -> tuple[sp.csr_matrix, np.ndarray]:
        scale = np.broadcast_to(1.0 / self.std, in_shape).reshape(-1)
        shift = np.broadcast_to(-self.mean / self.std, in_shape).reshape(-1)
        return sp.diags(scale, format="csr"), shift.astype(np.float64).copy()


@dataclass(eq=False)
class Add:
    """Residual addition: the current tensor plus the activation ``source``.

    Activations are numbered as in :meth:`Network.activations`: 0 is the network input and ``i + 1``
    the output of layer ``i``; ``source`` must be an earlier activation of the same shape.
    """

    source: int

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)


@dataclass(eq=False)
class Branch:
    """Continue from the earlier activation ``source`` (numbered as for :class:`Add`): the start of a
    second path, e.g. a residual block's downsampling shortcut, joined later by an :class:`Add`."""

    source: int

    def output_shape(self, in_shape: Shape) -> Shape:   # the source's shape (set by Network)
        return tuple(in_shape)


def pool_windows(in_shape: Shape, kernel, stride, padding, dilation=(1, 1), what: str = "pooling"
                 ) -> tuple[np.ndarray, Shape]:
    """The windows of a 2-D pooling on (C, H, W): ``idx`` (C·oh·ow, kh·kw) indices into the flattened
    input, ``-1`` where the window covers padding, and the output shape (C, oh, ow) (floor mode)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel, stride, padding, dilation))
    if len(in_shape) != 3:
        raise InvalidInputError(f"{what} expects input shape (C, H, W); got {in_shape}")
    C, H, W = in_shape
    oh = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise InvalidInputError(f"{what} output would be empty for input shape {in_shape}")
    c, p, q, i, j = np.meshgrid(np.arange(C), np.arange(oh), np.arange(ow), np.arange(kh), np.arange(kw),
                                indexing="ij")
    r = p * sh - ph + i * dh
    s = q * sw - pw + j * dw
    ok = (r >= 0) & (r < H) & (s >= 0) & (s < W)
    idx = np.where(ok, (c * H + r) * W + s, -1).reshape(C * oh * ow, kh * kw)
    return idx, (C, oh, ow)


def _check_pool(name: str, kernel, stride, padding, dilation=(1, 1)):
    kernel, padding, dilation = _pair(kernel), _pair(padding), _pair(dilation)
    stride = kernel if stride is None else _pair(stride)
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise InvalidInputError(f"{name} kernel/stride/dilation must be >= 1 and padding >= 0; got kernel "
                                f"{kernel}, stride {stride}, padding {padding}, dilation {dilation}")
    if any(2 * p > (k - 1) * d + 1 for p, k, d in zip(padding, kernel, dilation)):
        raise InvalidInputError(f"{name} padding must be at most half the (dilated) kernel; got padding "
                                f"{padding} for kernel {kernel}")
    return kernel, stride, padding, dilation


@dataclass(eq=False)
class MaxPool2d:
    """Max pooling on (C, H, W) (floor mode; padding never wins: it is −inf as in torch and ONNX)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self):
        self.kernel, self.stride, self.padding, self.dilation = _check_pool(
            "MaxPool2d", self.kernel, self.stride, self.padding, self.dilation)

    def output_shape(self, in_shape: Shape) -> Shape:
        return pool_windows(in_shape, self.kernel, self.stride, self.padding, self.dilation, "MaxPool2d")[1]

    def windows(self, in_shape: Shape) -> np.ndarray:
        """(n_out, kh·kw) indices into the flattened input, every entry valid: a padded position
        repeats a real element of its window (the max is unchanged)."""
        key = (tuple(in_shape), self.kernel, self.stride, self.padding, self.dilation)
        cache = self.__dict__.setdefault("_windows", {})   # the float64 re-check runs it per batch
        if key not in cache:
            idx, _ = pool_windows(in_shape, self.kernel, self.stride, self.padding, self.dilation, "MaxPool2d")
            first = idx.max(axis=1, keepdims=True)   # a valid element of each window (never all padding)
            cache[key] = np.where(idx >= 0, idx, first)
        return cache[key]

    def forward(self, x: np.ndarray) -> np.ndarray:
        idx = self.windows(x.shape[1:])
        out = x.reshape(x.shape[0], -1)[:, idx].max(axis=-1)
        return out.reshape((x.shape[0],) + self.output_shape(x.shape[1:]))


@dataclass(eq=False)
class AvgPool2d:
    """Average pooling on (C, H, W) (floor mode; linear). ``count_include_pad``: padding counts as
    zeros in the divisor (torch's default) or not (ONNX's default)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)
    count_include_pad: bool = True

    def __post_init__(self):
        self.kernel, self.stride, self.padding, _ = _check_pool("AvgPool2d", self.kernel, self.stride, self.padding)

    def output_shape(self, in_shape: Shape) -> Shape:
        return pool_windows(in_shape, self.kernel, self.stride, self.padding, (1, 1), "AvgPool2d")[1]

    def as_matrix(self, in_shape: Shape) -> tuple[sp.csr_matrix, np.ndarray]:
        idx, _ = pool_windows(in_shape, self.kernel, self.stride, self.padding, (1, 1), "AvgPool2d")
        ok = idx >= 0
        div = float(idx.shape[1]) if self.count_include_pad else ok.sum(axis=1, keepdims=True).astype(np.float64)
        vals = np.broadcast_to(1.0 / div, idx.shape)[ok]
        rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)[ok]
        M = sp.csr_matrix((vals, (rows, idx[ok])), shape=(idx.shape[0], int(np.prod(in_shape))))
        M.sum_duplicates()
        return M, np.zeros(idx.shape[0])

    def forward(self, x: np.ndarray) -> np.ndarray:
        M, _ = self.as_matrix(x.shape[1:])
        out = np.asarray(M @ x.reshape(x.shape[0], -1).T).T
        return out.reshape((x.shape[0],) + self.output_shape(x.shape[1:]))


Layer = Union[Dense, Conv2d, ReLU, Flatten, Normalize, Add, Branch, MaxPool2d, AvgPool2d]
LAYER_TYPES = (Dense, Conv2d, ReLU, Flatten, Normalize, Add, Branch, MaxPool2d, AvgPool2d)
AFFINE = (Dense, Conv2d, Flatten, Normalize, AvgPool2d)

# the numeric arrays of each layer type (checked finite whenever a Network is assembled)
_ARRAYS = {Dense: ("weight", "bias"), Conv2d: ("weight", "bias"), Normalize: ("mean", "std")}


def check_layer_finite(i: int, layer, name: str | None = None) -> None:
    """Raise ``InvalidInputError`` unless every numeric array of ``layer`` is finite (and a
    ``Normalize.std`` non-zero). The layer constructors check their arguments, but folding (ONNX
    Mul/Div/BatchNorm, torch BatchNorm) and callers may assign arrays afterwards; this is the check
    that :class:`Network` runs on every layer when it is assembled."""
    label = f"layer {i} ({type(layer).__name__}" + (f" {name!r})" if name else ")")
    attrs = next((a for cls, a in _ARRAYS.items() if isinstance(layer, cls)), ())
    for attr in attrs:
        arr = getattr(layer, attr, None)
        if arr is None:
            continue
        try:
            arr = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{label} {attr} must be a numeric array; got "
                                    f"{type(getattr(layer, attr)).__name__}") from None
        require_finite(f"{label} {attr}", arr)
        if attr == "std" and np.any(arr == 0):
            raise InvalidInputError(f"{label} std must be non-zero; got {int(np.sum(arr == 0))} zero entries")


def check_folded(layers, names, what: str) -> None:
    """After ``what`` (an ONNX node, a torch module) was folded into the last of ``layers``: check the
    products did not overflow, naming it (the :class:`Network` built at the end checks every layer)."""
    i = len(layers) - 1
    try:
        check_layer_finite(i, layers[i], names[i])
    except InvalidInputError as exc:
        raise InvalidInputError(f"{exc} (after folding {what} into it)") from None


@dataclass(frozen=True, eq=False)
class ConvGeometry:
    """A block weight that is exactly one :class:`Conv2d` of the block's input: its ``kernel`` (out, in,
    kh, kw), ``stride``, ``padding``, ``dilation`` and the (C, H, W) shapes it maps between. A hint for
    convolution-structured products (the bound engine checks it against the matrix before use)."""

    kernel: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_shape: Shape
    out_shape: Shape

    @classmethod
    def of(cls, conv: "Conv2d", in_shape: Shape) -> "ConvGeometry":
        return cls(np.array(conv.weight, dtype=np.float64), conv.stride, conv.padding, conv.dilation,
                   tuple(in_shape), tuple(conv.output_shape(in_shape)))


@dataclass(eq=False)
class AffineBlock:
    """Block ``i`` of the verification form: ``z_i = weight @ h_i + Σ_k skips[k] @ h_k + bias`` on
    flattened vectors, then (except for the last block) ``h_{i+1} = ReLU(z_i)``, or the max over
    each row of ``pool`` when ``pool`` is given (max pooling).

    ``weight`` CSR (n_i, |h_i|); ``skips`` a tuple of ``(k, CSR (n_i, |h_k|))`` with ``k < i``: the
    residual connections (``h_0`` is the network input); ``pool`` (|h_{i+1}|, window) int indices into
    ``z_i``, every entry valid (padding repeats a real element). ``conv``: where ``weight`` is one
    convolution of ``h_i`` (no layer folded into it), its :class:`ConvGeometry`; ``None`` otherwise.
    """

    weight: sp.csr_matrix
    bias: np.ndarray
    skips: tuple = ()
    pool: np.ndarray | None = None
    conv: ConvGeometry | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def n_act(self) -> int:
        """Size of the activation ``h_{i+1}`` this block feeds."""
        return self.weight.shape[0] if self.pool is None else int(self.pool.shape[0])

    def dense(self) -> np.ndarray:
        return self.weight.toarray()

    def terms(self, i: int) -> list:
        """``[(i, weight), (k, skip_k), …]``: every activation this block (number ``i``) reads."""
        return [(i, self.weight)] + list(self.skips)

    def stacked(self, i: int) -> tuple[sp.csr_matrix, list]:
        """All terms side by side: ``z_i = W @ concat(h_k for k in sources) + bias``; returns
        ``(W CSR, sources)``."""
        terms = self.terms(i)
        if len(terms) == 1:
            return self.weight, [i]
        return sp.hstack([W for _, W in terms], format="csr"), [k for k, _ in terms]


def is_plain(blocks) -> bool:
    """Whether blocks form the plain chain affine → ReLU → affine … (no skips, no max pooling)."""
    return all(not b.skips and b.pool is None for b in blocks)


def pool_split(l: np.ndarray, u: np.ndarray, pool: np.ndarray):
    """Data of the max-pool relaxation on pre-activation bounds ``l, u`` (n_z,): per output the window
    element ``star`` with the largest lower bound, the ``gap`` ``max(0, max_{e≠star} u_e − l_star)``
    (0: that element is always the max), and the output bounds ``[max l, max u]``.

    Sound lines (any window element may serve as ``star`` in the upper one):
    ``z_star <= max(window) <= z_star + gap`` and ``max(window) <= max u``."""
    lw, uw = l[pool], u[pool]
    k = np.argmax(lw, axis=1)
    rows = np.arange(pool.shape[0])
    star = pool[rows, k]
    l_star = lw[rows, k]
    # copies of star (padding repeats it) are the same variable: they never exceed it
    m_other = np.where(pool == star[:, None], -np.inf, uw).max(axis=1)
    gap = np.maximum(m_other - l_star, 0.0)
    return star, gap, lw.max(axis=1), uw.max(axis=1)


