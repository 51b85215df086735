"""Batched linear bounds on torch tensors (CPU or CUDA): CROWN, α-CROWN and β-CROWN.

The production bound engine of branch and bound (:mod:`mipprune.verification.bab`). The numpy
engine in :mod:`mipprune.verification.bounds` stays as the cheap root-stage engine (and LP) and as
the reference the tests compare against.

The network is seen as blocks (:func:`solvers.network.ir.as_blocks`): ``z_i = W_i h_i + Σ_k S_ik h_k
+ b_i`` (residual skips ``S_ik`` from earlier activations, ``k < i``), ``h_0 = x``, ``h_{i+1} =
ReLU(z_i)`` or a max pool of ``z_i``; the output is ``z_L``. Back-substitution walks the blocks last
to first and sums the coefficients of each activation over all its readers before relaxing it (a
DAG, not a chain). A max pool is relaxed by ``h >= z_star`` (the window element with the largest
lower bound) and ``h <= τ (z_star + gap) + (1 − τ) max u`` with ``τ ∈ [0, 1]`` optimized by
α-CROWN like the ReLU slopes (``gap = max(0, max_{e≠star} u_e − l_star)``; 0 when the window is
decided, where the relaxation is exact). Every function is batched over
``D`` sub-domains: per-domain input boxes ``lo, hi`` (D, n_0) and per-domain pre-activation bounds
``lower[i], upper[i]`` (D, n_i).

* :func:`backward_bound` — lower bound of ``C z_L + c`` (rows (D, m)) by back-substitution, with the
  CROWN relaxation of each ReLU (upper line ``u(z − l)/(u − l)``, lower line ``α z``). ``α`` may be
  given per (domain, row, neuron) (α-CROWN); split constraints ``z_j >= 0`` / ``z_j <= 0`` enter
  through multipliers ``β >= 0`` (β-CROWN: ``min f >= min f − β·s·z`` on the split domain).
* :func:`optimize_bound` — α (and β) optimized by projected gradient ascent (Adam); every
  iterate is a valid bound, the best per row is kept.
* :func:`forward_bounds` — intermediate bounds by forward linear propagation in terms of the input
  (cheap when the input has few coordinates: the input-splitting path).
* :func:`crown_intermediate` — intermediate bounds by full backward CROWN (root of ReLU BaB).

Round-off. On CPU everything runs in float64, on CUDA in float32 unless ``PRECISION`` (set by
``verify(precision=…)``) says otherwise; bounds are then loosened by ``slack(dtype)`` (``1e-9``
relative + absolute in float64, ``1e-4`` in float32) before any decision, so a bound that is positive
only by round-off never counts as "verified" (:func:`proven`). Counterexamples are
never taken from this module without the float64 forward re-check of the caller.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np
import torch

from solvers.errors import InvalidInputError, SolverNotAvailableError

__all__ = ["TorchNet", "resolve_device", "resolve_precision", "PRECISION", "slack", "proven", "interval_bounds",
           "forward_bounds", "crown_intermediate", "backward_bound", "optimize_bound", "concretize", "relaxation",
           "pool_relaxation", "act_bounds"]


# The bound engine's dtype where the caller gives none (verify(precision=...) sets it for one query):
# None = float64 on the CPU, float32 on CUDA.
PRECISION: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("precision", default=None)
PRECISIONS = {"auto": None, "float64": torch.float64, "float32": torch.float32}


def resolve_precision(precision) -> torch.dtype | None:
    """``"auto"`` (float64 on the CPU, float32 on CUDA), ``"float64"`` or ``"float32"``."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def resolve_device(device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; CUDA must be available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolverNotAvailableError(f"device {device!r} needs CUDA, but this torch build sees no GPU; "
                                      "use device='cpu'")
    return dev


def slack(dtype: torch.dtype) -> float:
    """Relative+absolute margin by which bounds are loosened against round-off."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def proven(lb: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``lb > 0`` beyond round-off (a bound of +1e-13 on a true minimum of 0 must not verify)."""
    s = slack(dtype or lb.dtype)
    return lb > s * (1.0 + lb.abs())


def _loosen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = slack(lo.dtype)
    return lo - s * (1.0 + lo.abs()), hi + s * (1.0 + hi.abs())


SPARSE_MAX_DENSITY = 0.25   # weight matrices sparser than this (e.g. convolutions as matrices) …
SPARSE_MIN_SIZE = 1 << 16   # … and at least this large use sparse products (OVAL21 convs: 5-30x faster, measured)
# with ``conv=True`` (opt-in, branch and bound's ``bab_options={"conv": True}``) convolutions of that size run as
# conv2d / conv_transpose2d in this dtype (the float32 steps of branch and bound, CUDA's default). On OVAL21's convs
# on 2 CPU threads they are 1-4x faster than CSR per product at 64-2,048 rows, but whole searches gained nothing
# (24 solved instances: median 4.1 -> 4.8 s; deep img1052 1.6x the domains per second, the proof no sooner); in
# float64 torch's CPU convolutions (no oneDNN kernel) are up to 2.5x slower than CSR (session 31). Not yet measured
# on a GPU, where cuDNN against cuSPARSE may differ.
CONV_DTYPE = torch.float32


def _csr(M, dtype, device) -> torch.Tensor:
    import warnings

    M = M.tocsr()
    M.sort_indices()
    with warnings.catch_warnings():   # torch flags sparse CSR as "beta" on construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.as_tensor(M.indptr, dtype=torch.int64),
                                       torch.as_tensor(M.indices, dtype=torch.int64),
                                       torch.as_tensor(M.data, dtype=dtype), size=M.shape, device=device,
                                       check_invariants=True)


class _SparseRight(torch.autograd.Function):
    """``x @ A.T`` for a sparse CSR ``A`` (n_out, n_in) given with its transpose ``AT``, batched over the
    leading dims of ``x`` (…, n_in); its gradient is ``g @ A`` (= ``(AT @ g.T).T``)."""

    @staticmethod
    def forward(ctx, x, A, AT):
        ctx.AT = AT
        shape = x.shape
        y = (A @ x.reshape(-1, shape[-1]).T.contiguous()).T
        return y.reshape(*shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, g):
        shape = g.shape
        gx = (ctx.AT @ g.reshape(-1, shape[-1]).T.contiguous()).T
        return gx.reshape(*shape[:-1], ctx.AT.shape[0]), None, None


class _SparseTerm:
    """A weight matrix ``W`` (n_out, n_in) as sparse CSR ``W``, ``W.T`` and ``|W|`` (torch)."""

    def __init__(self, W, WT, Wabs, M=None, conv=None):
        self.W, self.WT, self.Wabs = W, WT, Wabs
        self.M, self.conv = M, conv   # the scipy matrix and its convolution hint, for a change of dtype

    @classmethod
    def maybe(cls, M, dtype, device, conv=None) -> "_SparseTerm | None":
        import scipy.sparse as sps

        M = sps.csr_matrix(M)
        size = M.shape[0] * M.shape[1]
        if size < SPARSE_MIN_SIZE or M.nnz > SPARSE_MAX_DENSITY * size:
            return None
        return cls(_csr(M, dtype, device), _csr(M.T, dtype, device), _csr(abs(M), dtype, device), M, conv)

    def to(self, dtype, conv: bool = False) -> "_SparseTerm | _ConvTerm":
        """This term in ``dtype``; with ``conv``, its convolution where :meth:`_ConvTerm.maybe` gives one."""
        return ((conv and _ConvTerm.maybe(self.M, self.conv, dtype, self.W.device))
                or _SparseTerm(self.W.to(dtype), self.WT.to(dtype), self.Wabs.to(dtype), self.M, self.conv))

    def back(self, Lz: torch.Tensor) -> torch.Tensor:
        """``Lz @ W`` (…, n_out) → (…, n_in)."""
        return _SparseRight.apply(Lz, self.WT, self.W)

    def fwd(self, h: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """``h @ W.T`` (…, n_in) → (…, n_out) (``|W|`` with ``absolute``; no gradient then)."""
        if absolute:
            return (self.Wabs @ h.reshape(-1, h.shape[-1]).T.contiguous()).T.reshape(*h.shape[:-1], -1)
        return _SparseRight.apply(h, self.W, self.WT)


def _ieee_convs(device: torch.device):
    """cuDNN convolutions in full float32 (TF32, on by default for cuDNN, rounds their inputs to 10 bits, ~5e-4:
    beyond ``slack``)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False,
                   fp32_precision=None)


class _ConvTerm:
    """A block weight that is one convolution (:class:`~solvers.network.layers.ConvGeometry`), applied by
    ``conv2d`` / ``conv_transpose2d`` instead of its sparse matrix, in ``CONV_DTYPE`` (see there).

    The geometry is a hint from the IR: every term is checked against the matrix on random vectors
    (:meth:`matches`) before use, in its own dtype and device, and a mismatch keeps the sparse product."""

    PROBES = 3

    def __init__(self, K: torch.Tensor, g, output_padding: tuple[int, int], M):
        self.K, self.Kabs, self.g, self.output_padding, self.M = K, K.abs(), g, output_padding, M

    @classmethod
    def maybe(cls, M, g, dtype, device) -> "_ConvTerm | None":
        """The convolution ``g`` as a term for the matrix ``M`` (scipy, (n_out, n_in)) in ``dtype``, or ``None``
        (``dtype`` other than ``CONV_DTYPE``, no or a mismatched ``g``, a small matrix)."""
        if (dtype != CONV_DTYPE or g is None or M.shape != (int(np.prod(g.out_shape)), int(np.prod(g.in_shape)))
                or M.shape[0] * M.shape[1] < SPARSE_MIN_SIZE):   # small: a dense product is as fast
            return None
        (_, H, W), (_, oh, ow), (kh, kw) = g.in_shape, g.out_shape, g.kernel.shape[2:]
        # conv_transpose2d's output is short by what the strides dropped at the far edge: pad it back
        op = tuple(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                   for n, o, s, p, d, k in zip((H, W), (oh, ow), g.stride, g.padding, g.dilation, (kh, kw)))
        if any(not 0 <= e < max(s, d) for e, s, d in zip(op, g.stride, g.dilation)):
            return None
        term = cls(torch.as_tensor(g.kernel, dtype=dtype, device=device), g, op, M)
        return term if term.matches() else None

    def to(self, dtype, conv: bool = False) -> "_ConvTerm | _SparseTerm | None":
        """This term in ``dtype``: the convolution in ``CONV_DTYPE`` (with ``conv``), the CSR (or dense) product
        otherwise."""
        return _fast_term(self.M, self.g, dtype, self.K.device, conv)

    def matches(self) -> bool:
        """Whether ``back``, ``fwd`` and ``fwd(absolute)`` equal the matrix ``M``'s products on random vectors, to
        this dtype's round-off (relative to ``|M| |x|``)."""
        M = self.M
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((self.PROBES, M.shape[1])), rng.standard_normal((self.PROBES, M.shape[0]))
        xt, yt = (torch.as_tensor(a, dtype=self.K.dtype, device=self.K.device) for a in (x, y))
        x, y = xt.double().cpu().numpy(), yt.double().cpu().numpy()   # the probes as this dtype rounds them
        A = abs(M)
        tol = 1e-10 if self.K.dtype == torch.float64 else 1e-5   # TF32's errors would be ~1e-4 here (caught)
        with torch.no_grad():
            got = [self.fwd(xt), self.back(yt), self.fwd(xt, absolute=True)]
        want = [(M @ x.T).T, (M.T @ y.T).T, (A @ x.T).T]
        scale = [(A @ abs(x).T).T, (A.T @ abs(y).T).T, (A @ abs(x).T).T]
        return all(g.shape == w.shape and bool(np.all(np.abs(g.double().cpu().numpy() - w) <= tol * (sc + 1e-30)))
                   for g, w, sc in zip(got, want, scale))

    def back(self, Lz: torch.Tensor) -> torch.Tensor:
        """``Lz @ W`` (…, n_out) → (…, n_in)."""
        g, sh = self.g, Lz.shape[:-1]
        with _ieee_convs(Lz.device):
            x = torch.nn.functional.conv_transpose2d(Lz.reshape(-1, *g.out_shape), self.K, stride=g.stride,
                                                     padding=g.padding, output_padding=self.output_padding,
                                                     dilation=g.dilation)
        return x.reshape(*sh, -1)

    def fwd(self, h: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """``h @ W.T`` (…, n_in) → (…, n_out) (``|W|`` with ``absolute``: each entry is one kernel weight)."""
        g, sh = self.g, h.shape[:-1]
        with _ieee_convs(h.device):
            z = torch.nn.functional.conv2d(h.reshape(-1, *g.in_shape), self.Kabs if absolute else self.K,
                                           stride=g.stride, padding=g.padding, dilation=g.dilation)
        return z.reshape(*sh, -1)


def _fast_term(M, geometry, dtype, device, conv: bool = False):
    """The product for a weight matrix ``M`` (scipy): with ``conv``, its convolution ``geometry`` in
    ``CONV_DTYPE`` (checked); else its CSR; else ``None`` (dense)."""
    return (conv and _ConvTerm.maybe(M, geometry, dtype, device)) or _SparseTerm.maybe(M, dtype, device, geometry)


@dataclass
class TorchNet:
    """Dense torch copies of the blocks (:class:`~solvers.network.layers.AffineBlock`): ``W[i]``
    (n_i, |h_i|), ``b[i]`` (n_i,), ``skips[i]`` a list of ``(k, (n_i, |h_k|))`` residual terms and
    ``pool[i]`` the max-pool windows (|h_{i+1}|, window) as a long tensor, or ``None`` for a ReLU."""

    W: list
    b: list
    device: torch.device
    dtype: torch.dtype
    skips: list = None
    pool: list = None
    sparse: list = None   # per block, aligned with terms(i): a _ConvTerm, a _SparseTerm or None (dense products)

    def __post_init__(self):
        self.skips = self.skips or [[] for _ in self.W]
        self.pool = self.pool or [None for _ in self.W]
        self.sparse = self.sparse or [[None] * len(self.terms(i)) for i in range(len(self.W))]

    @classmethod
    def from_blocks(cls, blocks, device="cpu", dtype: torch.dtype | None = None, conv: bool = False) -> "TorchNet":
        """Torch copies of ``blocks``; with ``conv``, conv blocks (``AffineBlock.conv``) compute in float32 by
        ``conv2d`` / ``conv_transpose2d`` (:data:`CONV_DTYPE`)."""
        dev = resolve_device(device)
        dt = dtype or PRECISION.get() or (torch.float64 if dev.type == "cpu" else torch.float32)
        dense = lambda M: torch.as_tensor(np.asarray(M.toarray()), dtype=dt, device=dev)  # noqa: E731
        W = [dense(blk.weight) for blk in blocks]
        b = [torch.as_tensor(np.asarray(blk.bias), dtype=dt, device=dev) for blk in blocks]
        skips = [[(k, dense(M)) for k, M in blk.skips] for blk in blocks]
        pool = [None if blk.pool is None else torch.as_tensor(np.asarray(blk.pool), dtype=torch.long, device=dev)
                for blk in blocks]
        sparse = [[_fast_term(blk.weight, blk.conv, dt, dev, conv)]
                  + [_SparseTerm.maybe(S, dt, dev) for _, S in blk.skips] for blk in blocks]
        return cls(W, b, dev, dt, skips, pool, sparse)

    def to_dtype(self, dtype: torch.dtype, conv: bool = False) -> "TorchNet":
        """A copy in ``dtype`` (e.g. float32 for optimization steps whose bounds are re-evaluated in float64);
        ``conv`` as in :meth:`from_blocks`."""
        return TorchNet([w.to(dtype) for w in self.W], [b.to(dtype) for b in self.b], self.device, dtype,
                        [[(k, M.to(dtype)) for k, M in sk] for sk in self.skips], self.pool,
                        [[None if sp is None else sp.to(dtype, conv) for sp in row] for row in self.sparse])

    def back(self, i: int, t: int, W: torch.Tensor, Lz: torch.Tensor) -> torch.Tensor:
        """``Lz @ W`` for term ``t`` of block ``i`` (``W`` its dense matrix), sparse when it pays."""
        sp = self.sparse[i][t]
        return Lz @ W if sp is None else sp.back(Lz)

    def fwd(self, i: int, t: int, W: torch.Tensor, h: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """``h @ W.T`` (or ``h @ |W|.T``) for term ``t`` of block ``i``."""
        sp = self.sparse[i][t]
        if sp is None:
            return h @ (W.abs() if absolute else W).T
        return sp.fwd(h, absolute)

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def terms(self, i: int) -> list:
        """``[(i, W[i]), (k, skip), …]``: the activations block ``i`` reads and their weights."""
        return [(i, self.W[i])] + self.skips[i]

    def is_relu(self, j: int) -> bool:
        return self.pool[j] is None

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)

    def box(self, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
        """The input box as (1, n) tensors, rounded outward when this dtype is narrower than float64
        (a float32 box must contain the float64 one)."""
        lo64, hi64 = torch.as_tensor(np.asarray(lo, dtype=np.float64)), torch.as_tensor(np.asarray(hi, dtype=np.float64))
        l, u = lo64.to(self.dtype), hi64.to(self.dtype)
        if self.dtype != torch.float64:
            l = torch.where(l.double() > lo64, torch.nextafter(l, torch.full_like(l, -np.inf)), l)
            u = torch.where(u.double() < hi64, torch.nextafter(u, torch.full_like(u, np.inf)), u)
        return l.to(self.device)[None, :], u.to(self.device)[None, :]

    def act(self, j: int, z: torch.Tensor) -> torch.Tensor:
        """``h_{j+1}`` from ``z_j`` (…, n_j): ReLU or max pool."""
        return torch.relu(z) if self.pool[j] is None else z[..., self.pool[j]].amax(-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Plain forward (N, n_0) → (N, n_L) in this net's dtype (attacks only; never a re-check)."""
        hs = [X]
        for i in range(self.n_layers):
            z = sum(self.fwd(i, t, W, hs[k]) for t, (k, W) in enumerate(self.terms(i))) + self.b[i]
            if i == self.n_layers - 1:
                return z
            hs.append(self.act(i, z))


# ----------------------------------------------------------------------------------- relaxations
def relaxation(l: torch.Tensor, u: torch.Tensor):
    """CROWN relaxation on ``[l, u]`` (D, n): lower slope ``a`` (default α), upper slope ``s``,
    upper intercept ``t``, and the unstable mask; ``a z <= ReLU(z) <= s z + t``."""
    active = l >= 0
    unstable = (l < 0) & (u > 0)
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    s_un = torch.where(unstable, u / denom, torch.zeros_like(u))
    s = torch.where(active, torch.ones_like(u), s_un)
    t = torch.where(unstable, -s_un * l, torch.zeros_like(u))
    a = torch.where(active | (unstable & (u >= -l)), torch.ones_like(u), torch.zeros_like(u))
    return a, s, t, unstable


def pool_relaxation(l: torch.Tensor, u: torch.Tensor, pool: torch.Tensor):
    """Max-pool relaxation on pre-activation bounds ``[l, u]`` (D, n_z), windows ``pool`` (n_h, k):
    ``star`` (D, n_h) the window element with the largest lower bound, ``gap`` (D, n_h), and the
    output bounds ``lo, hi`` (D, n_h). Sound lines: ``z_star <= h``, ``h <= z_star + gap`` and
    ``h <= hi`` (any convex combination of the two upper lines too); ``gap == 0``: ``h = z_star``."""
    lw, uw = l[:, pool], u[:, pool]                        # (D, n_h, k)
    k = lw.argmax(dim=-1, keepdim=True)
    star = pool.expand(l.shape[0], -1, -1).gather(-1, k)[..., 0]
    l_star = lw.gather(-1, k)[..., 0]
    same = pool[None] == star[..., None]                   # padding repeats an element: the same variable
    m_other = torch.where(same, torch.full_like(uw, -torch.inf), uw).amax(-1)
    gap = (m_other - l_star).clamp(min=0)
    return star, gap, lw.amax(-1), uw.amax(-1)


def act_bounds(net: "TorchNet", j: int, l: torch.Tensor, u: torch.Tensor):
    """Bounds of ``h_{j+1}`` from those of ``z_j``."""
    if net.pool[j] is None:
        return l.clamp(min=0), u.clamp(min=0)
    _, _, lo, hi = pool_relaxation(l, u, net.pool[j])
    return lo, hi


def concretize(Lam: torch.Tensor, const: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, want_x: bool = True):
    """Exact minimum over the box of each row of ``Lam x + const``: ``Lam`` (D, m, n), ``const``
    (D, m), ``lo``/``hi`` (D, n). Returns (lb (D, m), argmin (D, m, n); ``None`` unless ``want_x``)."""
    lb = (Lam.clamp(min=0) * lo[:, None, :]).sum(-1) + (Lam.clamp(max=0) * hi[:, None, :]).sum(-1) + const
    X = torch.where(Lam > 0, lo[:, None, :], hi[:, None, :]) if want_x else None
    return lb, X


def interval_layer(net: TorchNet, i: int, hl, hu):
    """Interval bounds of ``z_i`` from bounds ``hl[k] <= h_k <= hu[k]`` (D, |h_k|) of the activations it reads."""
    c, r = net.b[i], 0.0
    for t, (k, W) in enumerate(net.terms(i)):
        mid, rad = (hl[k] + hu[k]) / 2, (hu[k] - hl[k]) / 2
        c = c + net.fwd(i, t, W, mid)
        r = r + net.fwd(i, t, W, rad, absolute=True)
    return _loosen(c - r, c + r)


def interval_bounds(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor):
    """Interval (IBP) bounds of every block, batched: lists of (D, n_i)."""
    lower, upper = [], []
    hl, hu = [lo], [hi]
    for i in range(net.n_layers):
        l, u = interval_layer(net, i, hl, hu)
        lower.append(l)
        upper.append(u)
        a, b = act_bounds(net, i, l, u)
        hl.append(a)
        hu.append(b)
    return lower, upper


def _pool_tau(gap: torch.Tensor) -> torch.Tensor:
    """Default weight of the linear upper line of a max pool: 1 where the window is decided (exact),
    else 0 (the constant ``max u``; the linear line is looser by ``u_star − l_star`` there)."""
    return (gap <= 0).to(gap.dtype)


def forward_bounds(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor, n_layers: int | None = None):
    """Intermediate bounds by forward linear propagation (symbolic intervals with CROWN's
    relaxation), intersected with IBP. Cost per domain O(Σ n_i n_{i-1} n_0): for few inputs.

    Returns lists ``lower, upper`` of (D, n_i) for blocks ``0 … n_layers−1`` (default all)."""
    n_layers = net.n_layers if n_layers is None else n_layers
    D, n0 = lo.shape
    eye = torch.eye(n0, dtype=net.dtype, device=net.device).expand(D, n0, n0)
    zero = torch.zeros(D, n0, dtype=net.dtype, device=net.device)
    # per activation h_k, linear functions of x: value = x @ A.T + c, A (D, n, n0), c (D, n)
    lin = [(eye, zero, eye, zero)]
    hl, hu = [lo], [hi]
    lower, upper = [], []
    for i in range(n_layers):
        il, iu = interval_layer(net, i, hl, hu)
        zAL = zAU = 0.0
        zcL = zcU = net.b[i]
        for k, W in net.terms(i):
            AL, cL, AU, cU = lin[k]
            Wp, Wn = W.clamp(min=0), W.clamp(max=0)
            zAL = zAL + Wp @ AL + Wn @ AU
            zcL = zcL + cL @ Wp.T + cU @ Wn.T
            zAU = zAU + Wp @ AU + Wn @ AL
            zcU = zcU + cU @ Wp.T + cL @ Wn.T
        l = concretize(zAL, zcL, lo, hi)[0]
        u = -concretize(-zAU, -zcU, lo, hi)[0]
        l, u = _loosen(l, u)
        l, u = torch.maximum(l, il), torch.minimum(u, iu)
        l = torch.minimum(l, u)
        lower.append(l)
        upper.append(u)
        if i == n_layers - 1:
            break
        a_l, a_u = act_bounds(net, i, l, u)
        hl.append(a_l)
        hu.append(a_u)
        if net.pool[i] is None:
            a, s, t, _ = relaxation(l, u)
            # h >= a·zL (a >= 0), h <= s·zU + t (s >= 0)
            lin.append((a[..., None] * zAL, a * zcL, s[..., None] * zAU, s * zcU + t))
        else:
            star, gap, _, top = pool_relaxation(l, u, net.pool[i])
            tau = _pool_tau(gap)
            g = lambda A: A.gather(1, star[..., None].expand(-1, -1, A.shape[-1]))  # noqa: E731
            lin.append((g(zAL), zcL.gather(1, star), tau[..., None] * g(zAU),
                        tau * (zcU.gather(1, star) + gap) + (1 - tau) * top))
    return lower, upper


# ----------------------------------------------------------------------------------- backward
def _relax_back(net: TorchNet, j: int, nu: torch.Tensor, l: torch.Tensor, u: torch.Tensor, alpha=None, relax=None):
    """Back through ``h_{j+1} = act(z_j)``: coefficients ``nu`` (D, m, |h|) on ``h`` → ``Lz`` (D, m, n_j)
    on ``z`` and a constant (D, m) with ``nu h >= Lz z + const`` on ``[l, u]``. ``alpha``: the lower
    slopes of unstable ReLUs (D, m, n_j), or for a max pool the weight τ ∈ [0, 1] of its linear upper
    line (D, m, |h|)."""
    pos, neg = nu.clamp(min=0), nu.clamp(max=0)
    if net.pool[j] is None:
        a, s, t, unstable = relaxation(l, u) if relax is None else relax
        a = torch.where(unstable[:, None, :], alpha.clamp(0, 1), a[:, None, :]) if alpha is not None else a[:, None, :]
        return pos * a + neg * s[:, None, :], (neg * t[:, None, :]).sum(-1)
    star, gap, _, top = pool_relaxation(l, u, net.pool[j])
    tau = _pool_tau(gap)[:, None, :] if alpha is None else alpha.clamp(0, 1)
    coef = pos + neg * tau                                              # on z_star (D, m, n_h)
    Lz = torch.zeros(nu.shape[:2] + (l.shape[1],), dtype=nu.dtype, device=nu.device)
    Lz = Lz.scatter_add(2, star[:, None, :].expand_as(coef), coef)
    const = (neg * (tau * gap[:, None, :] + (1 - tau) * top[:, None, :])).sum(-1)
    return Lz, const


def _back_step(net: TorchNet, i: int, Lz: torch.Tensor, Lh: dict):
    """One block of back-substitution: the coefficients ``Lz`` (D, m, n_i) on ``z_i`` pass through block ``i``'s
    terms into ``Lh`` (activation index → its coefficients, summed over every block that reads it). Returns the
    constant ``Lz @ b_i`` and, for ``i > 0``, the finished coefficients (D, m, |h_i|) on ``h_i``, taken out of
    ``Lh`` (zeros when nothing later reads ``h_i``); ``None`` at the input block."""
    const = Lz @ net.b[i]
    for t, (k, W) in enumerate(net.terms(i)):
        contrib = net.back(i, t, W, Lz)
        Lh[k] = Lh[k] + contrib if k in Lh else contrib
    if i == 0:
        return const, None
    nu = Lh.pop(i, None)
    if nu is None:
        nu = torch.zeros(Lz.shape[:2] + (net.W[i].shape[1],), dtype=Lz.dtype, device=Lz.device)
    return const, nu


def backward_bound(net: TorchNet, lower, upper, C: torch.Tensor, c0: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, *, layer: int | None = None, alphas: dict | None = None,
                   betas: dict | None = None, splits: dict | None = None, record: dict | None = None,
                   relax: dict | None = None, want_x: bool = True):
    """Lower bound of ``C z_layer + c0`` over each domain (default ``layer`` = output block).

    ``C`` (D, m, n_layer), ``c0`` (D, m); ``lower[j], upper[j]`` (D, n_j) for ``j < layer``, with
    any ReLU splits already applied (active ⇒ ``l >= 0``, inactive ⇒ ``u <= 0``). ``alphas[j]``
    (D, m, n_j) in [0, 1] replace the default lower slopes of unstable neurons (for a max-pool
    block, the weight of its linear upper line, (D, m, |h_{j+1}|)); ``betas[j]`` (D, m, n_j) >= 0
    with ``splits[j]`` (D, n_j) in {−1, 0, +1} add the β-CROWN terms. Residual skips: the
    coefficients of each activation are summed over every block that reads it before it is relaxed.
    ``record``, when given, receives per block ``j`` the coefficient (D, m, |h_{j+1}|) on its output.
    ``relax``: block → :func:`relaxation` of ``lower[j], upper[j]`` (precomputed by callers that bound the
    same domains many times); ``want_x=False`` skips the argmin (``None``).
    Returns ``(lb (D, m), argmin (D, m, n_0), Lam (D, m, n_0))``.
    """
    layer = net.n_layers - 1 if layer is None else layer
    Lh: dict = {}
    Lz, const = C, c0
    for i in range(layer, -1, -1):
        c, nu = _back_step(net, i, Lz, Lh)
        const = const + c
        if nu is None:
            break
        j = i - 1
        if record is not None:
            record[j] = nu
        Lz, c = _relax_back(net, j, nu, lower[j], upper[j], None if alphas is None else alphas.get(j),
                            None if relax is None else relax.get(j))
        const = const + c
        if betas is not None and j in betas:
            Lz = Lz - betas[j].clamp(min=0) * splits[j][:, None, :]
    Lam = Lh.pop(0)
    lb, X = concretize(Lam, const, lo, hi, want_x)
    return lb, X, Lam


def crown_intermediate(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor, start_lower=None, start_upper=None,
                       splits: dict | None = None):
    """Bounds of every block by backward CROWN layer by layer (batched over domains), intersected
    with IBP and ``start_*`` (lists of (D, n_i), e.g. LP-tightened root bounds); ReLU ``splits``
    (dict layer → (D, n) in {−1, 0, +1}) are applied as soon as a layer's bounds are known."""
    lower, upper = [], []
    hl, hu = [lo], [hi]
    D = lo.shape[0]
    for i in range(net.n_layers):
        n = net.W[i].shape[0]
        l, u = interval_layer(net, i, hl, hu)
        if i > 0:
            # ReLUs that the interval bounds decide (in every domain) keep an exact relaxation: skip their rows
            idx = torch.nonzero(((l < 0) & (u > 0)).any(0))[:, 0] if (net.is_relu(i) and i < net.n_layers - 1) \
                else torch.arange(n, device=net.device)
            k = idx.numel()
            if k:
                E = torch.zeros(k, n, dtype=net.dtype, device=net.device)
                E[torch.arange(k, device=net.device), idx] = 1.0
                C = torch.cat([E, -E], 0).expand(D, 2 * k, n)
                lb = backward_bound(net, lower, upper, C, torch.zeros(D, 2 * k, dtype=net.dtype, device=net.device),
                                    lo, hi, layer=i, want_x=False)[0]
                cl, cu = _loosen(lb[:, :k], -lb[:, k:])
                l, u = l.clone(), u.clone()
                l[:, idx] = torch.maximum(l[:, idx], cl)
                u[:, idx] = torch.minimum(u[:, idx], cu)
        if start_lower is not None:
            l, u = torch.maximum(l, start_lower[i]), torch.minimum(u, start_upper[i])
        if splits is not None and i in splits:
            l, u = apply_splits(l, u, splits[i])
        l = torch.minimum(l, u)
        lower.append(l)
        upper.append(u)
        a, b = act_bounds(net, i, l, u)
        hl.append(a)
        hu.append(b)
    return lower, upper


def split_intermediate(net: TorchNet, root_lower, root_upper, splits: dict, lo: torch.Tensor, hi: torch.Tensor,
                       rows: list | None = None, alphas: dict | None = None):
    """Pre-activation bounds of split sub-domains, recomputed below the first split (β-CROWN's
    intermediate-bound update): block ``i`` is re-bounded by backward CROWN over the domain's
    (already recomputed, split-applied) bounds of blocks ``< i`` when some domain has a split in a
    block ``< i``, and intersected with the root's; only neurons ``rows[i]`` (a long tensor, e.g. the
    root's unstable ones: the others are stable on every sub-domain and keep the root's bounds) are
    re-bounded. ``root_lower[i]`` (1 or D, n_i) for the ReLU/pool blocks ``i < L−1``; ``splits``
    dict block → (D, n_i) in {−1, 0, +1}. ``alphas`` (optional): block ``i`` → dict ``j`` → lower
    slopes (D, 2|rows[i]|, n_j) for the rows of block ``i`` (α-CROWN intermediate slopes).
    Returns lists ``lower, upper`` of (D, n_i), splits applied."""
    D = lo.shape[0]
    lower, upper = [], []
    first = None
    for j in sorted(splits):
        if bool((splits[j] != 0).any()):
            first = j
            break
    for i in range(len(root_lower)):
        l, u = root_lower[i].expand(D, -1), root_upper[i].expand(D, -1)
        idx = None if rows is None else rows[i]
        if first is not None and i > first and (idx is None or idx.numel()) and net.is_relu(i):
            n = net.W[i].shape[0]
            if idx is None:
                idx = torch.arange(n, device=net.device)
            k = idx.numel()
            E = torch.zeros(k, n, dtype=net.dtype, device=net.device)
            E[torch.arange(k, device=net.device), idx] = 1.0
            C = torch.cat([E, -E], 0).expand(D, 2 * k, n)
            lb = backward_bound(net, lower, upper, C, torch.zeros(D, 2 * k, dtype=net.dtype, device=net.device),
                                lo, hi, layer=i, alphas=None if alphas is None else alphas.get(i))[0]
            cl, cu = _loosen(lb[:, :k], -lb[:, k:])
            l, u = l.clone(), u.clone()
            l[:, idx] = torch.maximum(l[:, idx], cl)
            u[:, idx] = torch.minimum(u[:, idx], cu)
        if i in splits:
            l, u = apply_splits(l, u, splits[i])
        lower.append(torch.minimum(l, u))
        upper.append(u)
    return lower, upper


def optimized_intermediate(net: TorchNet, lo: torch.Tensor, hi: torch.Tensor, lower, upper, *, iters: int = 20,
                           lr: float = 0.1, deadline: float | None = None, first: int = 1):
    """α-CROWN bounds of the hidden ReLU blocks' unstable neurons, block by block (each block's new
    bounds serve the next): rows ``±e_j`` of block ``i``'s unstable neurons with their own lower
    slopes on every block ``< i``, ``iters`` Adam steps each, or fewer: each block gets an equal share
    of the time left before ``deadline`` (every iterate is sound), intersected with
    the given ``lower``/``upper`` (lists of (1, n_i) for blocks ``0 … L−2``) and loosened by
    :func:`slack`. A cheap stand-in for per-neuron LPs (which it approaches as it converges).
    ``first``: the first block to re-bound (the earlier ones are kept as given).
    Returns new lists and the number of blocks done before ``deadline``."""
    import time

    lower, upper = [t.clone() for t in lower], [t.clone() for t in upper]
    done = first
    for i in range(first, len(lower)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        done = i + 1
        if not net.is_relu(i):
            continue
        idx = torch.nonzero((lower[i][0] < 0) & (upper[i][0] > 0))[:, 0]
        k = idx.numel()
        if not k:
            continue
        n = net.W[i].shape[0]
        E = torch.zeros(k, n, dtype=net.dtype, device=net.device)
        E[torch.arange(k, device=net.device), idx] = 1.0
        C = torch.cat([E, -E], 0)[None]
        # each block gets an equal share of the time left (the later, cheaper blocks feed the output
        # directly: on OVAL21 deep the first two blocks used to take it all)
        share = None if deadline is None else time.perf_counter() + (deadline - time.perf_counter()) / (len(lower) - i)
        lb = optimize_bound(net, lower, upper, C, torch.zeros(1, 2 * k, dtype=net.dtype, device=net.device), lo, hi,
                            iters=iters, lr_alpha=lr, deadline=share, layer=i, want_x=False)[0]
        cl, cu = _loosen(lb[:, :k], -lb[:, k:])
        lower[i][:, idx] = torch.maximum(lower[i][:, idx], cl)
        upper[i][:, idx] = torch.minimum(upper[i][:, idx], cu)
        lower[i] = torch.minimum(lower[i], upper[i])
    return lower, upper, done


def apply_splits(l: torch.Tensor, u: torch.Tensor, split: torch.Tensor):
    """Active (+1) ⇒ ``l = max(l, 0)``; inactive (−1) ⇒ ``u = min(u, 0)``."""
    return torch.where(split > 0, l.clamp(min=0), l), torch.where(split < 0, u.clamp(max=0), u)


# ----------------------------------------------------------------------------------- α/β optimization
class _Ascent:
    """Adam ascent steps (Kingma & Ba) on plain tensors. Not ``torch.optim.Adam``: its first
    construction in a process imports torch's compiler stack (measured 2.8 s), which would eat the
    time limit of short queries."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8):
        self.groups, (self.b1, self.b2), self.eps, self.t = groups, betas, eps, 0
        self.state = [[(torch.zeros_like(p), torch.zeros_like(p)) for p in g["params"]] for g in groups]
        self.warm_rows: dict = {}   # (group, param) → rows (dim 0) whose moments started from earlier steps

    def warm(self, group: int, index: int, m: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> None:
        """Start the moments of parameter ``index`` of ``group`` at ``m``, ``v`` (its shape: bias-corrected
        estimates from earlier steps, e.g. a parent domain's) on the rows ``rows`` (dim 0, bool): those rows then
        need no bias correction; the others start at zero as usual."""
        p = self.groups[group]["params"][index]
        r = rows.view(-1, *[1] * (p.dim() - 1))
        m0, v0 = self.state[group][index]
        self.state[group][index] = (torch.where(r, m.to(p.dtype), m0), torch.where(r, v.to(p.dtype), v0))
        self.warm_rows[group, index] = r

    def moments(self, group: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected ``(m, v)`` of parameter ``index`` of ``group`` (what :meth:`warm` takes)."""
        m, v = self.state[group][index]
        c1, c2 = self._corrections(group, index)
        return m / c1, v / c2

    def _corrections(self, group: int, index: int):
        c1, c2 = 1 - self.b1 ** max(self.t, 1), 1 - self.b2 ** max(self.t, 1)
        r = self.warm_rows.get((group, index))
        if r is None:
            return c1, c2
        one = torch.ones((), dtype=self.state[group][index][0].dtype, device=r.device)
        return torch.where(r, one, c1 * one), torch.where(r, one, c2 * one)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows ``mask`` (along dim 0) of every parameter and its moments; the
        parameters become new leaf tensors (read them back from ``groups``)."""
        for g, st in zip(self.groups, self.state):
            g["params"] = [p.detach()[mask].requires_grad_(True) for p in g["params"]]
            st[:] = [(m[mask], v[mask]) for m, v in st]
        self.warm_rows = {k: r[mask] for k, r in self.warm_rows.items()}

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for gi, (g, st) in enumerate(zip(self.groups, self.state)):
            for pi, (p, (m, v)) in enumerate(zip(g["params"], st)):
                if p.grad is None:
                    continue
                c1, c2 = self._corrections(gi, pi)
                m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
                p.add_(g["lr"] * (m / c1) / ((v / c2).sqrt() + self.eps))


def optimize_bound(net: TorchNet, lower, upper, C: torch.Tensor, c0: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, *, splits: dict | None = None, iters: int = 20, lr_alpha: float = 0.1,
                   lr_beta: float = 0.05, alphas: dict | None = None, betas: dict | None = None,
                   deadline: float | None = None, out: dict | None = None, layer: int | None = None,
                   want_x: bool = True):
    """α-CROWN (and β-CROWN when ``splits`` are given) lower bound of ``C z_L + c0``.

    Starts from CROWN's slopes (or ``alphas``; β from 0 or ``betas``, warm starts from a parent
    domain), runs ``iters`` Adam steps of projected gradient ascent on the sum of the rows' bounds
    (rows already proven stop pulling), and keeps per row the best bound seen (each iterate is
    sound: any α in [0, 1], any β >= 0). Returns ``(lb (D, m), argmin (D, m, n_0), Lam of the first
    iterate, alphas)`` with the α of each row's best bound. ``out``, when given, receives the last
    iterate's ``"alphas"`` and ``"betas"`` (block → (D, m, ·); the better warm start for a domain's
    children, measured: the best iterate is often an early one) and the best bound's
    ``"best_alphas"``, ``"best_betas"`` (for domains that left the batch once proven: their last). ``layer``:
    bound ``C z_layer + c0`` instead of the output (intermediate bounds; α of blocks ``< layer``).
    ``want_x=False``: no argmin is tracked (``None`` returned; callers that re-evaluate the bound anyway).
    """
    import time

    D, m = c0.shape
    L = net.n_layers if layer is None else layer + 1
    warm = bool(alphas) or bool(betas)
    # the relaxations depend on lower/upper only: once per call, not once per step
    relax = {j: relaxation(lower[j], upper[j]) for j in range(L - 1) if net.pool[j] is None}
    with torch.no_grad():
        lb0, X0, Lam0 = backward_bound(net, lower, upper, C, c0, lo, hi, layer=layer, alphas=alphas if warm else None,
                                       betas=betas if (warm and betas and splits) else None,
                                       splits=splits if (warm and betas and splits) else None, relax=relax,
                                       want_x=want_x)
    best, best_X = lb0.clone(), (X0.clone() if want_x else None)
    if iters <= 0 or bool(proven(best).all()):
        if out is not None:
            out["alphas"], out["betas"] = alphas or {}, betas or {}
        return best, best_X, Lam0, alphas
    params = []
    al = {}
    for j in range(L - 1):
        if net.pool[j] is None:
            a, _, _, unstable = relax[j]
        else:   # a max pool: the weight τ of its linear upper line, where the window is undecided
            _, gap, _, _ = pool_relaxation(lower[j], upper[j], net.pool[j])
            a, unstable = _pool_tau(gap), gap > 0
        if not bool(unstable.any()):
            continue
        init = alphas[j] if alphas is not None and j in alphas else a[:, None, :].expand(D, m, -1)
        al[j] = init.detach().clone().requires_grad_(True)
        params.append(al[j])
    be = {}
    if splits:
        for j, s in splits.items():
            if bool((s != 0).any()):
                init = betas[j] if betas is not None and j in betas else torch.zeros(D, m, s.shape[1], dtype=net.dtype,
                                                                                     device=net.device)
                be[j] = init.detach().clone().requires_grad_(True)
    groups = []
    if al:
        groups.append({"params": list(al.values()), "lr": lr_alpha})
    if be:
        groups.append({"params": list(be.values()), "lr": lr_beta})
    if not groups:
        if out is not None:
            out["alphas"], out["betas"] = alphas or {}, betas or {}
        return best, best_X, Lam0, alphas
    opt = _Ascent(groups)
    # ``full_*``: per domain and row the parameters of the best bound so far (warm starts of children);
    # domains whose rows are all proven leave the batch
    full_al = {j: p.detach().clone() for j, p in al.items()}
    full_be = {j: p.detach().clone() for j, p in be.items()}
    alive = torch.arange(D, device=c0.device)
    sp = splits if be else None
    for _ in range(iters):
        if deadline is not None and time.perf_counter() > deadline:
            break
        opt.zero_grad()
        lb, X, _ = backward_bound(net, lower, upper, C, c0, lo, hi, layer=layer, alphas=al, betas=be or None,
                                  splits=sp, relax=relax, want_x=want_x)
        with torch.no_grad():
            everyone = alive.numel() == D   # no domain left yet: update in place, no gather/scatter
            cur = best if everyone else best[alive]
            better = lb > cur
            if everyone:
                torch.where(better, lb, best, out=best)
                if want_x:
                    torch.where(better[..., None], X, best_X, out=best_X)
            else:
                best[alive] = torch.where(better, lb, cur)
                if want_x:
                    best_X[alive] = torch.where(better[..., None], X, best_X[alive])
            for full, cur_p in ((full_al, al), (full_be, be)):   # the parameters of each row's best bound
                for j, p in cur_p.items():
                    if everyone:
                        torch.where(better[..., None], p.detach(), full[j], out=full[j])
                    else:
                        full[j][alive] = torch.where(better[..., None], p.detach(), full[j][alive])
        done = proven(best if everyone else best[alive])
        if bool(done.all()):
            break
        # rows already proven stop pulling on the shared slopes
        obj = torch.where(done, torch.zeros_like(lb), lb).sum()
        obj.backward()
        opt.step()
        with torch.no_grad():
            for p in al.values():
                p.clamp_(0, 1)
            for p in be.values():
                p.clamp_(min=0)
        finished = done.all(dim=1)
        if 4 * int(finished.sum()) >= finished.numel():   # shrink when a quarter is done
            keep = ~finished
            alive = alive[keep]
            opt.keep(keep)
            al = dict(zip(al, opt.groups[0]["params"])) if al else {}
            be = dict(zip(be, opt.groups[-1]["params"])) if be else {}
            lower, upper = [t[keep] for t in lower], [t[keep] for t in upper]
            relax = {j: tuple(t[keep] for t in r) for j, r in relax.items()}
            C, c0, lo, hi = C[keep], c0[keep], lo[keep], hi[keep]
            if sp is not None:
                sp = {j: t[keep] for j, t in sp.items()}
    if out is not None:
        out["alphas"] = {j: full_al[j].index_copy(0, alive, p.detach()) for j, p in al.items()}
        out["betas"] = {j: full_be[j].index_copy(0, alive, p.detach()) for j, p in be.items()}
        out["best_alphas"], out["best_betas"] = full_al, full_be
    return best.detach(), None if best_X is None else best_X.detach(), Lam0, full_al
