"""Joint selection over a channel group: one kept set shared by all the group's consumers.

A group's problem is the sum of its consumers' reconstruction errors over one kept set of units.
Each consumer ``q`` has its own statistics ``G_q = Z_qᵀZ_q``, ``B_q = Z_qᵀY_q``, ``‖Y_q‖²`` (from
:func:`mipprune.pruning.bridge.capture`); its columns that belong to the group are mapped to the
group's units, and the block-diagonal stack

    G = diag(G_q / ‖Y_q‖²),   B = diag(B_q / ‖Y_q‖²),   ‖Y‖² = Σ_q ‖Y'_q‖² / ‖Y_q‖²

is an ordinary :class:`solvers.SelectionProblem` (each column's group is its unit), so every method
(lasso, exact, greedy, backward, magnitude, random, the criteria) works on groups unchanged: the
least-squares refit of a block-diagonal problem separates into one refit per consumer.

**Weighting.** Each consumer enters with weight ``1/‖Y_q‖²``: the objective is the *sum of the
consumers' relative errors*. Consumers differ in scale by orders of magnitude (a squeeze-excitation
``fc1`` on pooled features next to a 3×3 conv on the full map, a classifier next to a bottleneck),
and an absolute sum would let the largest output decide alone; the relative error is what each
layer's row of the report shows, is invariant to rescaling a layer, and makes every consumer
equally important — we know nothing better about their downstream sensitivity at this point.

**Columns of other groups.** A consumer reading a concat also reads channels of other groups, which
stay (they are decided by their own groups). They are kept in its least squares: their columns are
*partialled out* (Schur complement ``G_AA − G_AF G_FF⁻¹ G_FA``, likewise for ``B`` and ``‖Y‖²``), so
the group's problem is exactly the consumer's error with those columns refitted alongside.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.linalg

from mipprune.pruning.channel_graph import ChannelGroup, Member
from mipprune.pruning.samples import LayerSamples, chunked_product
from solvers.errors import InvalidInputError
from solvers.selection.problem import SelectionProblem, solve_psd

__all__ = ["DEFAULT_RIDGE", "group_problem", "refit_consumers", "ridge_of"]


def ridge_of(gram: np.ndarray, ridge: float) -> float:
    """The absolute ridge ``ridge · mean(diag G)`` (0 for ``ridge = 0``)."""
    return float(ridge * max(np.trace(gram) / max(gram.shape[0], 1), 1e-300)) if ridge else 0.0


def _ridge_of_source(src, ridge: float) -> float:
    """:func:`ridge_of` for Gram statistics or samples (``mean(diag G) = ‖Z‖²/d``)."""
    if not ridge:
        return 0.0
    if isinstance(src, LayerSamples):
        return float(ridge * max(np.einsum("ij,ij->", src.Z, src.Z) / max(src.Z.shape[1], 1), 1e-300))
    return ridge_of(src.gram, ridge)


def _blocks(src, a: np.ndarray, f: np.ndarray):
    """(G_AA, G_AF, G_FF, B_A, B_F) of Gram statistics (slices) or samples (chunked products)."""
    if isinstance(src, LayerSamples):
        return (src.gram_block(a, a), src.gram_block(a, f), src.gram_block(f, f), src.cross_block(a),
                src.cross_block(f))
    G = src.gram
    return G[np.ix_(a, a)], G[np.ix_(a, f)], G[np.ix_(f, f)], src.cross[a], src.cross[f]


def _consumer_block(member: Member, st, ridge: float, out: np.ndarray):
    """(B', yy', units of the group's columns, W_A) of one consumer (``st``: LayerStatistics or
    LayerSamples), other groups partialled out; its G' is written into ``out`` (the consumer's
    diagonal block of the joint Gram: no copy of G' of its own, 170 MB for a 4,608-column 3×3 conv);
    products chunked."""
    cu = member.column_units()
    d = st.weights.shape[0]
    if cu.size != d:
        raise InvalidInputError(f"statistics of {member.module!r} must have {cu.size} columns (the layer's input "
                                f"in the channel graph); got {d}")
    a = np.flatnonzero(cu >= 0)
    f = np.flatnonzero(cu < 0)
    lam = _ridge_of_source(st, ridge)
    yy = float(st.target_sq)
    if not f.size and not isinstance(st, LayerSamples):  # every column is the group's: G' = G
        out[...] = st.gram
        B = st.cross  # (read only: the caller scales a copy)
    else:
        G, Gaf, Gff, B, Bf = _blocks(st, a, f)
        out[...] = G
        del G
        if f.size:
            if lam:
                Gff[np.diag_indices_from(Gff)] += lam
            X = solve_psd(Gff, np.hstack([Gaf.T, Bf]))
            Xa, Xb = X[:, :a.size], X[:, a.size:]
            out -= chunked_product(Gaf, Xa)
            B = B - chunked_product(Gaf, Xb)
            yy = yy - float(np.sum(Bf * Xb))
    if lam:
        out[np.diag_indices_from(out)] += lam
    return B, yy, cu[a], st.weights[a]


DEFAULT_RIDGE = 1e-6  # relative to the mean diagonal of each consumer's Gram


def group_problem(group: ChannelGroup, stats: Mapping, costs=None,
                  ridge: float = DEFAULT_RIDGE) -> SelectionProblem:
    """The joint :class:`solvers.SelectionProblem` of ``group`` (see the module docstring).

    Parameters
    ----------
    group : ChannelGroup
        A prunable group.
    stats : {consumer name: LayerStatistics or LayerSamples}
        Every consumer's statistics (or rows), captured on the model the group belongs to. Read one
        consumer at a time, in order: a mapping that captures on access holds one consumer at once.
    costs : array (n_units,), optional
    ridge : float
        Added to each consumer Gram's diagonal, times its mean diagonal: with fewer samples than
        columns (a wide 3×3 conv, a short calibration) ``G`` is singular and every refit would fall
        back to a slow least-squares solve; ``1e-6`` changes a full-rank problem negligibly and
        keeps Cholesky applicable. Errors reported by :func:`refit_consumers` use the plain Gram.

    Returns
    -------
    SelectionProblem over ``group.n_units`` channels (units); its ``error`` is
    ``Σ_q err_q / Σ_q ‖Y'_q‖²/‖Y_q‖²`` (a fixed multiple of the sum of relative errors). The joint
    Gram is allocated once and every consumer's block written into it in place.
    """
    sizes = [int(np.count_nonzero(m.column_units() >= 0)) for m in group.consumers]
    units = np.concatenate([m.column_units()[m.column_units() >= 0] for m in group.consumers])
    missing = np.setdiff1d(np.arange(group.n_units), units)  # units no consumer reads: a zero column each
    d = units.size + missing.size
    G = np.zeros((d, d))
    Bs, Ws, yy, offset = [], [], 0.0, 0
    for m, size in zip(group.consumers, sizes):
        if m.module not in stats:
            raise InvalidInputError(f"stats must hold every consumer of group {group.name!r}; got none for "
                                    f"{m.module!r}")
        st = stats[m.module]
        scale = 1.0 / max(float(st.target_sq), 1e-300)
        block = G[offset:offset + size, offset:offset + size]
        Bq, yq, _, Wq = _consumer_block(m, st, ridge, block)
        del st
        block *= scale
        Bs.append(Bq * scale)
        Ws.append(Wq)
        yy += max(yq, 0.0) * scale
        offset += size
    B = scipy.linalg.block_diag(*Bs)
    W = scipy.linalg.block_diag(*Ws)
    if missing.size:
        B = np.pad(B, ((0, missing.size), (0, 0)))
        W = np.pad(W, ((0, missing.size), (0, 0)))
        units = np.concatenate([units, missing])
    yy = max(yy, 1e-12 * len(sizes))
    return SelectionProblem(G, B, yy, units, costs=costs, weights=W)


def refit_consumers(group: ChannelGroup, mask: np.ndarray, stats: Mapping,
                    ridge: float = DEFAULT_RIDGE) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Least-squares weights and relative errors of every consumer of ``group`` keeping ``mask``.

    Returns ``({consumer: W (d, m) with zero rows on removed columns}, {consumer: relative error})``;
    columns of other groups are kept and refitted too. The fit uses the same relative ``ridge`` as
    :func:`group_problem`; the errors are measured on the plain statistics.
    """
    weights, errors = {}, {}
    for m in group.consumers:
        st = stats[m.module]
        if isinstance(st, LayerSamples):
            st = st.statistics()
        keep = np.ones(m.units.size, dtype=bool)
        mine = m.units >= 0
        keep[mine] = mask[m.units[mine]]
        problem = SelectionProblem(st.gram, st.cross, max(st.target_sq, 1e-300), st.groups, weights=st.weights)
        W = problem.refit(keep, ridge=ridge_of(st.gram, ridge))
        weights[m.module] = W
        errors[m.module] = problem.error_of(W)
    return weights, errors
