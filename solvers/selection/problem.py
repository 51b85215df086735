"""The channel-selection problem, held as sufficient statistics (numpy only).

A layer computes ``Y ≈ Z W`` where ``Z`` (n×d) holds its inputs, unfolded so that every column
belongs to one input *channel* (``groups[j]`` is the channel of column ``j``), and ``Y`` (n×m) its
outputs (pre-bias). Keeping the channel set ``S`` and refitting gives the relative error

    err(S) = min_W ‖Y − Z_S W‖² / ‖Y‖²,

which depends on the data only through ``G = ZᵀZ`` (d×d), ``B = ZᵀY`` (d×m) and ``‖Y‖²``. Those are
what the bridge accumulates, streaming, so no method ever needs the activations themselves.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from solvers.errors import InfeasibleBudgetError, InvalidInputError
from solvers.selection.linalg import chunked_product, diagonal_blocks, symmetrize_in_place


def _as_float_matrix(name: str, a, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be a {ndim}-D array; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} must be finite; got NaN or inf entries")
    return arr


def _symmetric(G: np.ndarray, block: int = 1024) -> np.ndarray:
    """``G`` itself when it is exactly symmetric (a Gram mirrored from one triangle, a group's joint
    problem), else ``(G + Gᵀ)/2`` as one new array: compared in row blocks and averaged in square blocks
    (:func:`symmetrize_in_place` on the copy), so a 7,168² joint Gram costs no d×d temporaries (it cost two,
    0.8 GB, at ResNet-50's stage-3 group)."""
    d = G.shape[0]
    if all(np.array_equal(G[i:i + block], G[:, i:i + block].T) for i in range(0, d, block)):
        return G
    out = G.copy()
    symmetrize_in_place(out, block)
    return out


def _solve_blocks(G: np.ndarray) -> list[tuple[int, int]]:
    """The diagonal blocks a refit or an error evaluation of ``G`` works on: searched only above 512
    columns, where one Cholesky or product of the whole costs more than the scan."""
    return diagonal_blocks(G) if G.shape[0] > 512 else [(0, G.shape[0])]


def solve_psd(G: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``G⁻¹B`` for a PSD ``G``: Cholesky, checked (it can "succeed" on a numerically singular ``G``
    with a garbage answer), else minimum-norm least squares (dead channels, too few samples)."""
    try:
        X = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G, check_finite=False), B, check_finite=False)
        if np.all(np.isfinite(X)) and np.linalg.norm(chunked_product(G, X) - B) <= 1e-6 * (np.linalg.norm(B) + 1e-300):
            return X
    except (np.linalg.LinAlgError, ValueError):
        pass
    return scipy.linalg.lstsq(G, B, cond=1e-12, check_finite=False)[0]


class SelectionProblem:
    """Group subset selection for one layer, from Gram statistics.

    Parameters
    ----------
    gram : array (d, d)
        ``ZᵀZ`` (float64; symmetric positive semi-definite).
    cross : array (d, m)
        ``ZᵀY``.
    target_sq : float
        ``‖Y‖²_F`` (must be > 0).
    groups : int array (d,)
        Channel index (0 … C−1) of each column; every channel must own at least one column.
    costs : array (C,), optional
        Non-negative cost of keeping each channel (for budgets; default 1 each).
    weights : array (d, m), optional
        The layer's current weights in the same layout; default the full least-squares fit.
    """

    def __init__(self, gram, cross, target_sq, groups, costs=None, weights=None):
        G = _as_float_matrix("gram", gram, 2)
        B = _as_float_matrix("cross", cross, 2)
        d = G.shape[0]
        if G.shape != (d, d):
            raise InvalidInputError(f"gram must be square; got shape {G.shape}")
        if B.shape[0] != d:
            raise InvalidInputError(f"cross must have {d} rows (one per column of Z); got shape {B.shape}")
        target_sq = float(target_sq)
        if not np.isfinite(target_sq) or target_sq <= 0:
            raise InvalidInputError(f"target_sq (‖Y‖²) must be a finite number > 0; got {target_sq}")
        g = np.asarray(groups)
        if g.shape != (d,):
            raise InvalidInputError(f"groups must have shape ({d},) (one channel per column); got {g.shape}")
        if g.size and not np.issubdtype(g.dtype, np.integer):
            if not np.all(np.equal(np.mod(g, 1), 0)):
                raise InvalidInputError("groups must hold integer channel indices; got non-integers")
        g = g.astype(np.int64)
        if d == 0:
            raise InvalidInputError("the problem must have at least one column; got d = 0")
        if g.min() < 0:
            raise InvalidInputError(f"groups must be channel indices >= 0; got {g.min()}")
        C = int(g.max()) + 1
        present = np.bincount(g, minlength=C)
        if np.any(present == 0):
            missing = np.flatnonzero(present == 0)[:5].tolist()
            raise InvalidInputError(f"every channel 0..{C - 1} must own a column; got none for {missing}")
        if costs is None:
            c = np.ones(C)
        else:
            c = np.asarray(costs, dtype=np.float64).reshape(-1)
            if c.shape != (C,):
                raise InvalidInputError(f"costs must have shape ({C},) (one per channel); got {c.shape}")
            if np.any(~np.isfinite(c)) or np.any(c < 0):
                raise InvalidInputError("costs must be finite and >= 0; got negative or non-finite entries")
        self.gram = _symmetric(G)
        self._block_cache = None
        self.cross = B
        self.target_sq = target_sq
        self.groups = g
        self.costs = c
        self.n_channels = C
        self._weights = None                  # (the full fit: refit on first use, see :attr:`weights`)
        if weights is not None:
            W = _as_float_matrix("weights", weights, 2)
            if W.shape != B.shape:
                raise InvalidInputError(f"weights must have shape {B.shape} (d×m); got {W.shape}")
            self._weights = W

    @property
    def weights(self) -> np.ndarray:
        """The layer's weights (d×m): the caller's, else the full least-squares fit, computed on first use (a
        factorization of the whole Gram that exact selection's restarts and most methods never need)."""
        if self._weights is None:
            self._weights = self.refit(np.ones(self.n_channels, dtype=bool))
        return self._weights

    @weights.setter
    def weights(self, W: np.ndarray) -> None:
        self._weights = W

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_data(cls, Z, Y, groups, costs=None, weights=None) -> "SelectionProblem":
        """Build from materialized data: ``Z`` (n×d) inputs, ``Y`` (n×m) outputs."""
        Z = _as_float_matrix("Z", Z, 2)
        Y = _as_float_matrix("Y", Y, 2)
        if Z.shape[0] != Y.shape[0]:
            raise InvalidInputError(
                f"Z and Y must have the same number of rows (samples); got {Z.shape[0]} and {Y.shape[0]}"
            )
        if Z.shape[0] == 0:
            raise InvalidInputError("Z and Y must hold at least one sample; got 0 rows")
        return cls(Z.T @ Z, Z.T @ Y, float(np.sum(Y * Y)), groups, costs=costs, weights=weights)

    # ------------------------------------------------------------------ sizes
    @property
    def n_columns(self) -> int:
        """d, the number of columns of Z."""
        return self.gram.shape[0]

    @property
    def n_outputs(self) -> int:
        """m, the number of outputs of the layer."""
        return self.cross.shape[1]

    def __repr__(self) -> str:
        return (f"SelectionProblem(channels={self.n_channels}, columns={self.n_columns}, "
                f"outputs={self.n_outputs})")

    # ------------------------------------------------------------------ validation helpers
    def check_mask(self, mask) -> np.ndarray:
        """Return ``mask`` as a bool array (C,), or raise ``InvalidInputError``."""
        m = np.asarray(mask)
        if m.shape != (self.n_channels,):
            raise InvalidInputError(f"mask must have shape ({self.n_channels},); got {m.shape}")
        return m.astype(bool)

    def check_k(self, k) -> int:
        """Return ``k`` as an int in [1, C], or raise ``InvalidInputError``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InvalidInputError(f"k must be an integer; got {k!r}")
        if not 1 <= int(k) <= self.n_channels:
            raise InvalidInputError(f"k must satisfy 1 <= k <= {self.n_channels}; got {k}")
        return int(k)

    def check_budget(self, budget) -> float:
        """Return ``budget`` (total ``costs`` of the kept channels) as a float that lets at least the
        cheapest channel in, or raise ``InvalidInputError`` / ``InfeasibleBudgetError``."""
        budget = float(budget)
        if not budget >= 0:
            raise InvalidInputError(f"budget must be >= 0; got {budget}")
        if self.costs.min() > budget:
            raise InfeasibleBudgetError(
                f"budget must allow at least one channel (cheapest costs {self.costs.min():g}); got {budget:g}")
        return budget

    def column_mask(self, mask) -> np.ndarray:
        """Bool array (d,): the columns owned by the kept channels."""
        return self.check_mask(mask)[self.groups]

    # ------------------------------------------------------------------ evaluation
    def gram_blocks(self) -> list[tuple[int, int, np.ndarray | slice]]:
        """``[(start, stop, outputs)]``: the diagonal blocks of the Gram (:func:`_solve_blocks`, found
        once) and the output columns each block's cross statistics use. A channel group's joint problem
        is block-diagonal, one block per consumer: refits and error evaluations work block by block on
        the block's own outputs, and no d×d or d×m temporary of the kept part is formed (at ResNet-50's
        stage-3 group, a 7,168-column problem with 3,840 outputs, those were 0.4 GB per call)."""
        if self._block_cache is None:
            blocks = _solve_blocks(self.gram)
            if len(blocks) == 1:
                self._block_cache = [(0, self.gram.shape[0], slice(None))]
            else:
                self._block_cache = [(a, b, np.flatnonzero(np.any(self.cross[a:b] != 0, axis=0)))
                                     for a, b in blocks]
        return self._block_cache

    def refit(self, mask, ridge: float = 0.0) -> np.ndarray:
        """Least-squares weights (d×m) on the kept columns, zeros on the others.

        Solves ``(G_SS + ridge·I) W_S = B_S`` (Cholesky; minimum-norm least squares when
        ``G_SS`` is singular, e.g. for dead channels), one diagonal block of ``G`` at a time.
        """
        cols = self.column_mask(mask)
        W = np.zeros_like(self.cross)
        for a, b, outs in self.gram_blocks():
            idx = a + np.flatnonzero(cols[a:b])
            if not idx.size:
                continue
            G = self.gram[np.ix_(idx, idx)]
            if ridge:
                G[np.diag_indices_from(G)] += ridge
            if isinstance(outs, slice):
                W[idx] = solve_psd(G, self.cross[idx])
            elif outs.size:  # the block's own outputs: its weights are zero on the others
                W[np.ix_(idx, outs)] = solve_psd(G, self.cross[np.ix_(idx, outs)])
        return W

    def error_of(self, weights) -> float:
        """Relative error ``‖Y − Z W‖² / ‖Y‖²`` of arbitrary weights (d×m)."""
        W = np.asarray(weights, dtype=np.float64)
        if W.shape != self.cross.shape:
            raise InvalidInputError(f"weights must have shape {self.cross.shape}; got {W.shape}")
        return self._error_on(np.flatnonzero(np.any(W != 0, axis=1)), W)

    def _error_on(self, rows: np.ndarray, W: np.ndarray) -> float:
        """:meth:`error_of` of ``W`` (d×m) on its rows ``rows`` (sorted), taken as zero elsewhere: only
        the kept rows of ``G`` are read (pruned weights), one diagonal block at a time."""
        quad = lin = 0.0
        for a, b, _outs in self.gram_blocks():
            idx = rows[(rows >= a) & (rows < b)]
            if not idx.size:
                continue
            Wb = W[a:b] if idx.size == b - a else W[idx]
            lin += float(np.sum(Wb * (self.cross[a:b] if idx.size == b - a else self.cross[idx])))
            used = np.flatnonzero(np.any(Wb != 0, axis=0))  # the block's outputs (a group's consumer)
            if used.size < Wb.shape[1]:
                Wb = Wb[:, used]
            G = self.gram[np.ix_(idx, idx)] if idx.size < b - a else self.gram[a:b, a:b]
            quad += float(np.sum(Wb * chunked_product(G, Wb)))
        sq = self.target_sq - 2.0 * lin + quad
        return max(0.0, float(sq)) / self.target_sq

    def error(self, mask, *, refit: bool = True) -> float:
        """Relative reconstruction error of keeping the channels in ``mask``.

        With ``refit=True`` (default) the kept weights are refitted by least squares; with
        ``refit=False`` the current weights are kept and the dropped rows zeroed (without a d×m copy).
        """
        if refit:
            return self.error_of(self.refit(mask))
        rows = np.flatnonzero(self.column_mask(mask) & np.any(self.weights != 0, axis=1))
        return self._error_on(rows, self.weights)

    def channel_norms(self, ord: int = 1) -> np.ndarray:
        """Per-channel norm (C,) of the current weights (L1 by default: sum of |w| over the group)."""
        a = np.abs(self.weights) if ord == 1 else self.weights ** 2
        per_row = a.sum(axis=1)
        out = np.bincount(self.groups, weights=per_row, minlength=self.n_channels)
        return out if ord == 1 else np.sqrt(out)

    def mask_from_support(self, support) -> np.ndarray:
        """Bool mask (C,) from an iterable of kept channel indices."""
        m = np.zeros(self.n_channels, dtype=bool)
        m[np.asarray(list(support), dtype=np.int64)] = True
        return m
