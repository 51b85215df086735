"""Importance criteria for transformer sites: the structured-pruning baselines of LLMs.

Each criterion scores the units of a :class:`~mipprune.pruning.transformer_sites.Site` (attention
heads / kv groups, or MLP neurons), higher = keep, from the site consumer's weight and the
statistics the bridge already gathers for its input ``Z`` (n × d, d = ``site.n_columns``):

* ``weight`` — float64 (d, m), the consumer's weight in the bridge layout (``consumer.weight.T``):
  row ``j`` is the weight column that reads input column ``j``;
* ``gram`` — (d, d) ``ZᵀZ`` over ``n_samples`` rows (tokens);
* ``mean`` — (d,) column means of ``Z``.

Criteria (``TRANSFORMER_CRITERIA``):

``"magnitude_tp"``
    Torch-Pruning's group magnitude (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR
    2023; ``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")``,
    the importance of its LLM pruning example). Every member layer of a group contributes, per
    channel, the *squared* L2 norm of the weights that channel owns (an output row of a producer, an
    input column of the consumer); members are averaged (``group_reduction="mean"``); a head's score
    is the mean over its channels (Torch-Pruning's ``prune_num_heads``), and the scores of a site are
    divided by their mean (``normalizer="mean"``), which leaves the ranking inside a site unchanged
    and makes sites comparable. With only the consumer this is the mean squared column norm of the
    unit; pass ``producer_weights`` (the q/k/v or gate/up weights, torch layout ``(out, in)``) to add
    the producers' rows as Torch-Pruning does. Data-free.

``"wanda_sp"``
    Structured Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
    Language Models", ICLR 2024; structured variant "Wanda-sp" of An, Zhao, Yu, Tang, Wang, "Fluctuation-
    based Adaptive Structured Pruning for Large Language Models", AAAI 2024): the Wanda score
    ``|W_ij|·‖X_j‖`` summed over the unit's columns ``j`` and the consumer's outputs ``i``, i.e.
    ``Σ_{j∈unit} ‖X_j‖ · Σ_i |W_ij|`` with ``‖X_j‖ = sqrt(gram_jj)``. (The FLAP reference code takes
    the mean over outputs instead of the sum and ``‖X_j‖`` per sequence: a constant factor per site.)

``"flap"``
    FLAP's weighted input-feature variance "WIFV" (An et al., AAAI 2024): a column whose input hardly
    fluctuates can be replaced by its mean (see :func:`flap_bias`), and its removal then costs
    ``Var(X_j)·‖W_j‖²`` of output energy. Score = ``Σ_{j∈unit} ‖W_j‖²·Var(X_j)`` with
    ``Var(X_j) = gram_jj/n − mean_j²`` (population variance, clipped at 0).

    FLAP compares units *across* layers and modules ("AL-AM", adaptive over all layers, attention and
    MLP): per module type it stacks every layer's per-column metrics, standardizes each layer's
    vector (subtract its mean, divide by its standard deviation: :func:`standardize`), averages a
    head's standardized columns into one head score, concatenates heads and neurons of all layers,
    and removes the lowest scores until the removed parameters reach the target, weighing each head
    by its parameter count relative to a neuron (``4·hidden·head_dim / (3·hidden)`` for LLaMA: 512/3
    at head_dim 128). Per-layer use (a uniform ratio per site, FLAP's "UL-UM") needs no
    standardization. (The reference code also squares the attention output projection's per-column
    metric before reducing it to heads; this module does not, following the paper's formula.)

The removed columns are then compensated in the consumer's bias: :func:`flap_bias`.
None of these criteria reconstructs the remaining weights or proves anything about the error.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mipprune.pruning.transformer_sites import Site
from solvers.errors import InvalidInputError

#: Criterion names accepted by :func:`unit_scores` (each is also a selector method).
TRANSFORMER_CRITERIA = ("magnitude_tp", "wanda_sp", "flap")

__all__ = ["TRANSFORMER_CRITERIA", "unit_scores", "flap_bias", "standardize"]


def _check_site(site) -> tuple[int, int, int]:
    try:
        n_units, per_unit = int(site.n_units), int(site.unit_columns)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInputError(f"site must be a mipprune.pruning.transformer_sites.Site; "
                                f"got {type(site).__name__}") from None
    if n_units < 1 or per_unit < 1:
        raise InvalidInputError(f"site must have n_units >= 1 and unit_columns >= 1; got {n_units} and {per_unit}")
    return n_units, per_unit, n_units * per_unit


def _array(name: str, value, shape: tuple, site_name: str) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (``None`` in ``shape``: any positive size)."""
    want = "(" + ", ".join("m" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if value is None:
        raise InvalidInputError(f"{name} must be given (shape {want}) for this criterion; got None")
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != len(shape) or any((s is None and a < 1) or (s is not None and a != s)
                                     for a, s in zip(arr.shape, shape)):
        raise InvalidInputError(f"{name} of site {site_name!r} must have shape {want}; got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} must be finite; got NaN or inf entries")
    return arr


def _n_samples(n_samples) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise InvalidInputError(f"n_samples must be an int >= 1 (rows of Z behind gram and mean); got {n_samples!r}")
    return int(n_samples)


def _per_unit(column_values: np.ndarray, n_units: int) -> np.ndarray:
    """Sum of a per-column quantity over each unit's consecutive columns."""
    return column_values.reshape(n_units, -1).sum(axis=1)


def _magnitude_tp(weight: np.ndarray, n_units: int, producer_weights, site_name: str) -> np.ndarray:
    # Per member: mean over the unit's channels of the channel's squared L2 norm.
    members = [_per_unit(np.einsum("jm,jm->j", weight, weight), n_units) / (weight.shape[0] // n_units)]
    for i, p in enumerate(producer_weights or ()):
        arr = np.asarray(p, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] % n_units or arr.shape[0] == 0:
            raise InvalidInputError(f"producer_weights[{i}] of site {site_name!r} must be a 2-D (out, in) weight with "
                                    f"out a positive multiple of n_units = {n_units}; got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"producer_weights[{i}] must be finite; got NaN or inf entries")
        members.append(_per_unit(np.einsum("rk,rk->r", arr, arr), n_units) / (arr.shape[0] // n_units))
    scores = np.mean(members, axis=0)
    scale = scores.mean()
    return scores / scale if scale > 0 else scores


def unit_scores(method: str, site: Site, *, weight, gram=None, mean=None, n_samples: int | None = None,
                producer_weights: Sequence | None = None) -> np.ndarray:
    """Importance of each unit of ``site`` under a baseline criterion (higher = keep).

    Parameters
    ----------
    method : str
        One of ``TRANSFORMER_CRITERIA``.
    site : Site
        The heads or neurons scored (``n_units`` units of ``unit_columns`` consecutive columns each).
    weight : array (d, m)
        The consumer's weight in the bridge layout (``consumer.weight.T``), d = ``site.n_columns``.
    gram : array (d, d)
        ``ZᵀZ`` of the consumer's input over ``n_samples`` rows (``"wanda_sp"``, ``"flap"``).
    mean : array (d,)
        Column means of the consumer's input (``"flap"``).
    n_samples : int
        Rows (tokens) behind ``gram`` and ``mean`` (``"flap"``).
    producer_weights : sequence of arrays (out, in), optional
        ``"magnitude_tp"`` only: the producers' weights in torch layout (e.g. q/k/v, gate/up), whose
        rows split into ``n_units`` equal consecutive blocks (a GQA kv group owns ``head_dim ·
        q-per-kv`` q rows and ``head_dim`` k and v rows). Default: the consumer alone.

    Returns
    -------
    np.ndarray, float64, shape (site.n_units,)
    """
    if method not in TRANSFORMER_CRITERIA:
        raise InvalidInputError(f"method must be one of {list(TRANSFORMER_CRITERIA)}; got {method!r}")
    n_units, _, d = _check_site(site)
    name = getattr(site, "name", "?")
    W = _array("weight", weight, (d, None), name)
    if producer_weights is not None and method != "magnitude_tp":
        raise InvalidInputError(f"producer_weights is only read by 'magnitude_tp'; got it with {method!r}")
    if method == "magnitude_tp":
        return _magnitude_tp(W, n_units, producer_weights, name)
    G = _array("gram", gram, (d, d), name)
    diag = np.diag(G)
    if method == "wanda_sp":
        if n_samples is not None:
            _n_samples(n_samples)
        col_norm = np.sqrt(np.clip(diag, 0.0, None))
        return _per_unit(col_norm * np.abs(W).sum(axis=1), n_units)
    n = _n_samples(n_samples)
    mu = _array("mean", mean, (d,), name)
    variance = np.clip(diag / n - mu**2, 0.0, None)
    return _per_unit(np.einsum("jm,jm->j", W, W) * variance, n_units)


def flap_bias(site: Site, keep, weight, mean) -> np.ndarray:
    """FLAP's bias compensation: the consumer's output that the removed columns contributed on average.

    Removing column ``j`` of ``Y = Z W + b`` and adding ``W_j · mean_j`` to ``b`` keeps the mean output
    unchanged: the returned delta is ``Σ_{j removed} W_j · mean_j`` (add it to the consumer's bias,
    or use it as the bias when the consumer has none).

    Parameters
    ----------
    site : Site
    keep : int array
        Kept unit indices (distinct, in ``[0, site.n_units)``).
    weight : array (d, m)
        The consumer's dense weight in the bridge layout (d = ``site.n_columns``).
    mean : array (d,)
        Column means of the consumer's input.

    Returns
    -------
    np.ndarray, float64, shape (m,)
    """
    n_units, per_unit, d = _check_site(site)
    name = getattr(site, "name", "?")
    W = _array("weight", weight, (d, None), name)
    mu = _array("mean", mean, (d,), name)
    k = np.asarray(keep)
    if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)):
        raise InvalidInputError(f"keep must be a 1-D array of unit indices; got shape {k.shape}, dtype {k.dtype}")
    if k.size and (k.min() < 0 or k.max() >= n_units):
        raise InvalidInputError(f"keep must hold unit indices in [0, {n_units}); got {k.min()}..{k.max()}")
    if np.unique(k).size != k.size:
        raise InvalidInputError("keep must not repeat a unit; got duplicates")
    removed = np.ones(n_units, dtype=bool)
    removed[k] = False
    cols = np.repeat(removed, per_unit)
    return mu[cols] @ W[cols]


def standardize(scores) -> np.ndarray:
    """FLAP's per-layer standardization ``(s − mean(s)) / std(s)`` (sample std, as ``torch.std``),
    which makes the scores of different layers comparable for a global threshold; a constant vector
    maps to zeros."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size < 2:
        raise InvalidInputError(f"scores must be a 1-D array of at least 2 values; got shape {s.shape}")
    sd = s.std(ddof=1)
    return (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
