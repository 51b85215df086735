"""Verification specifications: an input region and an unsafe output region.

The input region is a box ``lower <= x <= upper`` (flattened inputs), optionally intersected with an
L1 ball ``‖x − l1_center‖₁ <= l1_radius`` (as in Cacciola et al.). The unsafe output region is a
disjunction of conjunctions: the output ``y`` is unsafe iff for some disjunct ``(A, b)`` all rows of
``A y <= b`` hold. A counterexample is an input in the region whose float64 forward output is unsafe.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solvers.errors import InvalidInputError


def check_box(lower, upper, n_inputs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``lower``, ``upper`` as flat float64 arrays of one shape (``(n_inputs,)`` when given), finite,
    with ``lower <= upper``; else ``InvalidInputError``."""
    lo = np.asarray(lower, dtype=np.float64).reshape(-1)
    hi = np.asarray(upper, dtype=np.float64).reshape(-1)
    if n_inputs is not None and (lo.shape != (n_inputs,) or hi.shape != (n_inputs,)):
        raise InvalidInputError(f"lower and upper must have shape ({n_inputs},); got {lo.shape} and {hi.shape}")
    if lo.shape != hi.shape:
        raise InvalidInputError(f"lower and upper must have the same shape; got {lo.shape} and {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise InvalidInputError("lower and upper must be finite; got NaN or inf")
    if np.any(lo > hi):
        i = int(np.flatnonzero(lo > hi)[0])
        raise InvalidInputError(f"input box must be non-empty (lower <= upper); "
                                f"got lower[{i}]={lo[i]} > upper[{i}]={hi[i]}")
    return lo, hi


@dataclass(frozen=True)
class Region:
    """Input region: box ``lower <= x <= upper`` (n,), optionally ∩ ``‖x − l1_center‖₁ <= l1_radius``."""

    lower: np.ndarray
    upper: np.ndarray
    l1_center: np.ndarray | None = None
    l1_radius: float | None = None

    @property
    def has_l1(self) -> bool:
        return self.l1_center is not None


def make_region(n_inputs: int, lower, upper, l1_center=None, l1_radius=None) -> Region:
    """Validate and pack an input region of ``n_inputs`` coordinates."""
    lo, hi = check_box(lower, upper, n_inputs)
    if (l1_center is None) != (l1_radius is None):
        raise InvalidInputError("l1_center and l1_radius must be given together; got only one of them")
    if l1_center is None:
        return Region(lo, hi)
    c = np.asarray(l1_center, dtype=np.float64).reshape(-1)
    if c.shape != (n_inputs,) or not np.all(np.isfinite(c)):
        raise InvalidInputError(f"l1_center must be a finite array of shape ({n_inputs},); got shape {c.shape}")
    r = float(l1_radius)
    if not r >= 0:
        raise InvalidInputError(f"l1_radius must be >= 0; got {l1_radius}")
    # the cheapest point of the box in L1 distance is the projection of the centre
    if np.abs(np.clip(c, lo, hi) - c).sum() > r * (1 + 1e-12) + 1e-12:
        raise InvalidInputError(f"input region must be non-empty; got an L1 ball (radius {r}) that misses the box")
    return Region(lo, hi, c, r)


@dataclass(frozen=True, eq=False)
class Spec:
    """One verification query. Shapes: ``lower``/``upper`` (n_inputs,), each disjunct ``A`` (k, n_outputs),
    ``b`` (k,)."""

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: tuple = field(default_factory=tuple)
    l1_center: np.ndarray | None = None
    l1_radius: float | None = None
    name: str = ""

    def __post_init__(self):
        lo, hi = check_box(self.lower, self.upper)
        if not self.disjuncts:
            raise InvalidInputError("the unsafe output region must have at least one disjunct; got none")
        ds = []
        n_out = None
        for j, (A, b) in enumerate(self.disjuncts):
            A = np.atleast_2d(np.asarray(A, dtype=np.float64))
            b = np.asarray(b, dtype=np.float64).reshape(-1)
            if A.shape[0] != b.shape[0]:
                raise InvalidInputError(f"disjunct {j}: A must have one row per entry of b; got {A.shape} and {b.shape}")
            if n_out is not None and A.shape[1] != n_out:
                raise InvalidInputError(f"disjunct {j}: A must have {n_out} columns; got {A.shape[1]}")
            n_out = A.shape[1]
            ds.append((A, b))
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(self, "disjuncts", tuple(ds))
        if self.l1_center is not None:
            c = np.asarray(self.l1_center, dtype=np.float64).reshape(-1)
            if c.shape != lo.shape:
                raise InvalidInputError(f"l1_center must have shape {lo.shape}; got {c.shape}")
            if self.l1_radius is None or not self.l1_radius >= 0:
                raise InvalidInputError(f"l1_radius must be >= 0 with an l1_center; got {self.l1_radius}")
            object.__setattr__(self, "l1_center", c)
            object.__setattr__(self, "l1_radius", float(self.l1_radius))

    @property
    def n_inputs(self) -> int:
        return self.lower.size

    @property
    def n_outputs(self) -> int:
        return self.disjuncts[0][0].shape[1]

    # ------------------------------------------------------------------ membership
    def contains_input(self, x, tol: float = 0.0) -> bool:
        """Whether flat input ``x`` (n_inputs,) lies in the input region (up to ``tol``)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != self.lower.shape:
            return False
        ok = bool(np.all(x >= self.lower - tol) and np.all(x <= self.upper + tol))
        if ok and self.l1_center is not None:
            ok = float(np.abs(x - self.l1_center).sum()) <= self.l1_radius + tol
        return ok

    def unsafe_margin(self, y) -> float:
        """``min_j max_i (A_j y − b_j)_i``: <= 0 iff output ``y`` (n_outputs,) is unsafe."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        return float(min(np.max(A @ y - b) for A, b in self.disjuncts))

    def is_counterexample(self, network, x, tol: float = 0.0) -> bool:
        """Float64 re-check: ``x`` is in the input region and ``network.forward(x)`` is unsafe."""
        if not self.contains_input(x, tol=tol):
            return False
        return self.unsafe_margin(network.forward(np.asarray(x, dtype=np.float64).reshape(-1))) <= 0.0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def robustness(cls, center, eps: float, label: int, n_outputs: int, *, norm: str = "linf",
                   lower: float = 0.0, upper: float = 1.0, name: str = "") -> "Spec":
        """"Some other logit >= the true label's logit" around ``center`` (flat, n_inputs).

        ``norm="linf"``: box ``[center − eps, center + eps] ∩ [lower, upper]``;
        ``norm="l1"``: the box ``[lower, upper]`` intersected with ``‖x − center‖₁ <= eps``.
        One disjunct per other class ``j``: ``y_label − y_j <= 0``.
        """
        c = np.asarray(center, dtype=np.float64).reshape(-1)
        if not eps >= 0:
            raise InvalidInputError(f"eps must be >= 0; got {eps}")
        if not 0 <= label < n_outputs:
            raise InvalidInputError(f"label must be in [0, {n_outputs}); got {label}")
        ds = []
        for j in range(n_outputs):
            if j != label:
                A = np.zeros((1, n_outputs))
                A[0, label], A[0, j] = 1.0, -1.0
                ds.append((A, np.zeros(1)))
        if norm == "linf":
            return cls(np.clip(c - eps, lower, upper), np.clip(c + eps, lower, upper), tuple(ds), name=name)
        if norm == "l1":
            lo = np.maximum(np.full_like(c, lower), c - eps)
            hi = np.minimum(np.full_like(c, upper), c + eps)
            return cls(lo, hi, tuple(ds), l1_center=c, l1_radius=eps, name=name)
        raise InvalidInputError(f"norm must be 'linf' or 'l1'; got {norm!r}")
