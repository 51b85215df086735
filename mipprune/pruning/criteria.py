"""Importance criteria: per-channel scores of a prune group, the classic baselines of channel pruning.

Every criterion gives a score per channel of a :class:`~mipprune.pruning.graph.PruneGroup` (higher = more
important); :class:`~mipprune.pruning.selector.ChannelSelector` keeps the ``k`` best and then refits the
consumer by least squares on the layer's :class:`~solvers.SelectionProblem`, like every other method.
None of them proves anything about the reconstruction error.

Weight criteria read the producer's parameters:

- ``"l1"`` — L1 norm of each output filter of the producer (Li et al., ICLR 2017).
- ``"bn_scale"`` — ``|γ|`` of the BatchNorm between producer and consumer (Network Slimming, Liu et
  al., ICCV 2017); a group without a BatchNorm is an :class:`~solvers.errors.InvalidInputError`.

Activation criteria read the producer's *post-activation* feature maps (the output of the producer
followed by the BatchNorm / activation / dropout ops that come straight after it, before any
pooling or flatten), streamed over the first ``max_images`` calibration images:

- ``"hrank"`` — average matrix rank of each channel's H×W feature map (HRank, Lin et al., CVPR
  2020). A Linear producer's "map" is a 1×1 matrix whose rank is 1 iff the activation is non-zero,
  so the score reduces to the channel's firing rate (fraction of images where it is non-zero).
  Ties (frequent: many maps have full rank, many units always fire) are broken by the mean
  absolute activation, scaled below the rank's resolution ``1/N`` so it never reorders distinct ranks.
- ``"mean_activation"`` — mean absolute post-activation value over images and positions (DropNet,
  Min et al. 2020; for ReLU networks this is the plain mean activation).
- ``"similarity"`` — redundancy clustering (Zhang et al. 2019): channels whose feature maps point the
  same way are redundant. Each channel's maps over the calibration images form one vector; vectors
  are L2-normalised (a dead channel stays the zero vector), their pairwise Euclidean distances (on
  unit vectors, ``√(2 − 2 cos)``) are computed from the streamed C×C channel Gram matrix, and
  average-linkage agglomerative clustering (scikit-learn) cuts them into exactly ``k`` clusters.
  The medoid of each cluster (largest summed cosine similarity to its cluster, ties to the lower
  index) is kept: representatives score 1, the others 0. Dead channels (all-zero maps) are left
  out of the clustering unless fewer than ``k`` channels are alive. This criterion needs ``k``.

Random selection is the ``"random"`` method of :mod:`solvers.selection.baselines`.

**Channel groups** (:class:`~mipprune.pruning.channel_graph.ChannelGroup`: residual streams, concats,
depthwise / grouped convolutions; :func:`group_scores`). A group's unit is written by several
producers (every conv adding into a residual stream) and sliced in BatchNorms; a criterion scores a
unit by summing over the group's members and over the unit's channels (a grouped conv's unit is
several channels):

- ``"l1"``: Σ over the group's producers of the L1 norms of the unit's output filters;
- ``"bn_scale"``: Σ over the group's BatchNorms of ``|γ|`` of the unit's channels (a group without an
  affine BatchNorm is an :class:`~solvers.errors.InvalidInputError`);
- ``"hrank"``, ``"mean_activation"``: Σ over producers of the channel scores above, each read on
  that producer's post-activation map (all producers in one forward);
- ``"similarity"``: a unit's feature vector is the concatenation over producers of its maps (the
  unit's channels summed), so the unit Gram is ``Σ_p M_p G_p M_pᵀ`` (``M_p``: channel → unit
  indicator); clustering and medoids as above.

The kept units are then refitted on the group's joint problem (:mod:`mipprune.pruning.joint`), like
every other method.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx
from torch import nn

from mipprune.pruning.graph import (_ACT_FUNCTIONS, _ACT_METHODS, PruneGroup, _classify_module, _is_shape_value,
                                   _leaves, fx_trace)
from mipprune.torch_utils import evaluation_mode, model_device, prepare_input
from solvers.errors import InvalidInputError, UnsupportedLayerError

WEIGHT_CRITERIA = ("l1", "bn_scale")
ACTIVATION_CRITERIA = ("hrank", "mean_activation", "similarity")
#: Every criterion name (each is also a ``ChannelSelector`` method).
CRITERIA = WEIGHT_CRITERIA + ACTIVATION_CRITERIA
#: Calibration images read by the activation criteria (HRank reports ranks stable after a few hundred).
DEFAULT_IMAGES = 256

__all__ = ["CRITERIA", "WEIGHT_CRITERIA", "ACTIVATION_CRITERIA", "DEFAULT_IMAGES", "channel_scores", "group_scores",
           "l1_scores", "bn_scale_scores", "activation_statistics", "ActivationStatistics",
           "hrank_scores", "mean_activation_scores", "similarity_scores", "similarity_clusters"]


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _check_group(model: nn.Module, group: PruneGroup) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(group, PruneGroup):
        raise InvalidInputError(f"group must be a mipprune.pruning.graph.PruneGroup; got {type(group).__name__}")
    mods = _modules(model)
    producer = mods.get(group.producer)
    if not isinstance(producer, (nn.Conv2d, nn.Linear)):
        raise InvalidInputError(f"group producer must be a Conv2d/Linear of the model; got {group.producer!r}")
    n_out = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    if n_out != group.n_channels:
        raise InvalidInputError(f"producer {group.producer!r} must have {group.n_channels} outputs (the group's "
                                f"channels); got {n_out}")
    return producer


# ------------------------------------------------------------------------------------- weight criteria
def l1_scores(model: nn.Module, group: PruneGroup) -> np.ndarray:
    """L1 norm (C,) of each output filter of the group's producer (Li et al. 2017), float64."""
    producer = _check_group(model, group)
    w = producer.weight.detach().to(torch.float64)
    return w.abs().reshape(w.shape[0], -1).sum(dim=1).cpu().numpy()


def bn_scale_scores(model: nn.Module, group: PruneGroup) -> np.ndarray:
    """``|γ|`` (C,) of the group's BatchNorm (Network Slimming); the product over several BatchNorms.

    Raises ``InvalidInputError`` when no affine BatchNorm sits between producer and consumer.
    """
    _check_group(model, group)
    mods = _modules(model)
    bns = [mods[b] for b in group.batchnorms if getattr(mods[b], "weight", None) is not None]
    if not bns:
        raise InvalidInputError(
            f"criterion 'bn_scale' needs an affine BatchNorm between producer {group.producer!r} and consumer "
            f"{group.consumer!r}; got {'a BatchNorm without affine scale' if group.batchnorms else 'none'}")
    score = np.ones(group.n_channels)
    for bn in bns:
        score *= bn.weight.detach().abs().to(torch.float64).cpu().numpy()
    return score


# ------------------------------------------------------------------------------------- feature maps
def _is_channelwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """BatchNorm / activation / dropout ops (pooling and flatten excluded: they change the map)."""
    if node.op == "call_module":
        return _classify_module(modules[node.target]) in ("bn", "act")
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    return False


class _Stop(Exception):
    """Raised by the recorder once the wanted value is seen: the rest of the forward is skipped."""


class _Recorder(torch.fx.Interpreter):
    """Runs the trace, keeping the values of ``node_names``; stops once all are seen."""

    def __init__(self, gm: torch.fx.GraphModule, node_names: set[str]):
        super().__init__(gm)
        self.node_names, self.values = node_names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.node_names:
            self.values[n.name] = out.detach().clone()  # a later in-place op (out += x) must not change it
            if len(self.values) == len(self.node_names):
                raise _Stop
        return out


def _map_reader(model: nn.Module, group: PruneGroup):
    """A function ``x -> post-activation output of the producer`` (traced with fx; an untraceable
    ``nn.Sequential`` is read with a forward hook on the last channel-wise module after the producer)."""
    try:
        read = _maps_reader(model, [group.producer])
    except _Untraceable:
        if not isinstance(model, nn.Sequential):
            raise
        return _sequential_reader(model, group)
    return lambda x: read(x)[group.producer]


class _Untraceable(UnsupportedLayerError):
    """torch.fx could not trace the model."""


def _maps_reader(model: nn.Module, producers: list[str]):
    """A function ``x -> {producer: its post-activation output}`` for several producers, read in one
    forward of the fx trace (stopped once the last one is computed)."""
    try:
        gm = fx_trace(model, "model must be traceable by torch.fx (or be an nn.Sequential) for activation criteria")
    except UnsupportedLayerError as exc:
        raise _Untraceable(str(exc)) from exc
    modules = dict(gm.named_modules())
    nodes: dict[str, str] = {}
    for producer in producers:
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == producer), None)
        if node is None:
            raise InvalidInputError(f"group producer {producer!r} must be called by the model's forward; got no call")
        while True:
            users = [u for u in node.users if not _is_shape_value(u)]
            if len(users) != 1 or not _is_channelwise(users[0], modules):
                break
            node = users[0]
        nodes[node.name] = producer

    def read(x: torch.Tensor) -> dict[str, torch.Tensor]:
        rec = _Recorder(gm, set(nodes))
        try:
            rec.run(x)
        except _Stop:
            pass
        missing = [nodes[n] for n in nodes if n not in rec.values]
        if missing:
            raise InvalidInputError(f"the forward must compute the output of {missing[0]!r}; got none")
        return {nodes[n]: v for n, v in rec.values.items()}

    return read


def _sequential_reader(model: nn.Sequential, group: PruneGroup):
    leaves = list(_leaves(model))
    names = [n for n, _ in leaves]
    if group.producer not in names:
        raise InvalidInputError(f"group producer {group.producer!r} must be a module of the model; got none")
    i = names.index(group.producer)
    while i + 1 < len(leaves) and _classify_module(leaves[i + 1][1]) in ("bn", "act"):
        i += 1
    module = leaves[i][1]

    def read(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
        try:
            model(x)
        finally:
            handle.remove()
        if not seen:
            raise InvalidInputError(f"the forward must call {leaves[i][0]!r}; got no call")
        return seen[0]

    return read


class ActivationStatistics:
    """Streamed per-channel statistics of a group's post-activation maps (all float64 numpy).

    Attributes
    ----------
    n_images : int
        Images read.
    rank_sum : array (C,)
        Sum over images of each channel's map rank (1×1 maps of Linear producers: 1 if non-zero).
    abs_sum : array (C,)
        Sum of ``|activation|`` over images and positions.
    positions : int
        Spatial positions per map (H·W; 1 for a Linear producer).
    gram : array (C, C)
        ``Σ a_c a_cᵀ`` over images and positions (channel Gram of the maps).
    """

    def __init__(self, n_channels: int, need_rank: bool):
        self.n_images = 0
        self.positions = 1
        self.need_rank = need_rank
        self.rank_sum = np.zeros(n_channels)
        self.abs_sum = np.zeros(n_channels)
        self.gram = np.zeros((n_channels, n_channels))

    def add(self, maps: torch.Tensor) -> None:
        a = maps.detach()
        n, c = a.shape[:2]
        if a.ndim == 4:
            self.positions = a.shape[2] * a.shape[3]
            if self.need_rank:
                self.rank_sum += torch.linalg.matrix_rank(a.float()).sum(dim=0).double().cpu().numpy()
        elif a.ndim == 2:
            if self.need_rank:
                self.rank_sum += (a != 0).sum(dim=0).double().cpu().numpy()
        else:
            raise UnsupportedLayerError(f"post-activation maps must be (N, C, H, W) or (N, C); got {tuple(a.shape)}")
        flat = a.double().transpose(0, 1).reshape(c, -1)        # (C, N·H·W)
        self.abs_sum += flat.abs().sum(dim=1).cpu().numpy()
        self.gram += (flat @ flat.T).cpu().numpy()
        self.n_images += n


def activation_statistics(model: nn.Module, group: PruneGroup, data: Iterable, *,
                          max_images: int = DEFAULT_IMAGES, need_rank: bool = True) -> ActivationStatistics:
    """Run ``model`` (eval mode, no grad, left untouched) on the first ``max_images`` inputs of ``data``
    (batches ``x`` or ``(x, y, ...)``) and stream the statistics of the group's post-activation maps."""
    from mipprune.torch_utils import split_batch

    producer = _check_group(model, group)
    if isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or max_images < 1:
        raise InvalidInputError(f"max_images must be an integer >= 1; got {max_images!r}")
    read = _map_reader(model, group)
    stats = ActivationStatistics(group.n_channels, need_rank)
    dev = model_device(model)
    with evaluation_mode(model):
        for batch in data:
            x, _ = split_batch(batch)
            x = x[: max_images - stats.n_images]
            if len(x) == 0:
                break
            maps = read(prepare_input(model, x, dev))
            if maps.ndim < 2 or maps.shape[1] != group.n_channels:
                raise UnsupportedLayerError(f"post-activation output of {type(producer).__name__} {group.producer!r} "
                                            f"must have {group.n_channels} channels in dim 1; got {tuple(maps.shape)}")
            stats.add(maps)
            if stats.n_images >= max_images:
                break
    if stats.n_images == 0:
        raise InvalidInputError("data must yield at least one image; got none")
    return stats


def hrank_scores(stats: ActivationStatistics) -> np.ndarray:
    """Average feature-map rank (C,) with the mean-activation tie-break (see the module docstring)."""
    n = stats.n_images
    avg_rank = stats.rank_sum / n
    mean = mean_activation_scores(stats)
    top = mean.max()
    tie = 0.5 / n * (mean / top if top > 0 else mean)  # < rank resolution 1/n: breaks ties only
    return avg_rank + tie


def mean_activation_scores(stats: ActivationStatistics) -> np.ndarray:
    """Mean absolute post-activation value (C,) over images and positions (DropNet)."""
    return stats.abs_sum / (stats.n_images * stats.positions)


def _cosine(stats: ActivationStatistics) -> tuple[np.ndarray, np.ndarray]:
    """``(cos (C, C), alive (C,))``: cosine similarity of the channels' map vectors (0 against a dead,
    all-zero channel) and which channels are alive."""
    norms = np.sqrt(np.maximum(np.diag(stats.gram), 0.0))
    alive = norms > 1e-12 * max(float(norms.max()), 1e-300)
    inv = np.where(alive, 1.0 / np.where(alive, norms, 1.0), 0.0)
    return stats.gram * inv[:, None] * inv[None, :], alive


def similarity_clusters(stats: ActivationStatistics, k: int) -> np.ndarray:
    """Cluster label (C,) in 0 … k−1 of each channel (average linkage on normalised maps).

    Dead channels (all-zero maps on the calibration data) form clusters of their own only when
    fewer than ``k`` channels are alive; otherwise the ``k`` clusters cover the live channels and
    every dead channel gets the label −1 (never a representative).
    """
    from sklearn.cluster import AgglomerativeClustering

    C = stats.gram.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= C:
        raise InvalidInputError(f"k must satisfy 1 <= k <= {C}; got {k!r}")
    cos, alive = _cosine(stats)
    live = np.flatnonzero(alive)
    if live.size <= k:  # every live channel alone, then dead ones (by index) fill the rest
        labels = np.full(C, -1, dtype=np.int64)
        labels[live] = np.arange(live.size)
        dead = np.flatnonzero(~alive)[: k - live.size]
        labels[dead] = live.size + np.arange(dead.size)
        return labels
    labels = np.full(C, -1, dtype=np.int64)
    if k == 1:
        labels[live] = 0
        return labels
    sub = cos[np.ix_(live, live)]
    dist = np.sqrt(np.maximum(2.0 - 2.0 * sub, 0.0))  # ‖û_c − û_c'‖ for unit vectors
    np.fill_diagonal(dist, 0.0)
    labels[live] = AgglomerativeClustering(n_clusters=int(k), metric="precomputed",
                                           linkage="average").fit_predict(dist)
    return labels


def similarity_scores(stats: ActivationStatistics, k: int) -> np.ndarray:
    """1 for the medoid of each of the ``k`` clusters, 0 for the others (C,)."""
    labels = similarity_clusters(stats, k)
    cos, _ = _cosine(stats)
    scores = np.zeros(labels.size)
    for lab in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == lab)
        closeness = cos[np.ix_(members, members)].sum(axis=1)
        scores[members[int(np.argmax(closeness))]] = 1.0  # argmax: first (lowest index) of ties
    return scores


def channel_scores(criterion: str, model: nn.Module, group: PruneGroup, data: Iterable | None = None, *,
                   k: int | None = None, max_images: int = DEFAULT_IMAGES) -> np.ndarray:
    """Scores (C,) of the group's channels by ``criterion`` (one of :data:`CRITERIA`); higher = keep.

    Parameters
    ----------
    criterion : str
    model : nn.Module
        Read only (activation criteria run it in eval mode under ``no_grad``; flags restored).
    group : PruneGroup
        From :func:`mipprune.pruning.graph.find_prune_groups` on ``model``.
    data : iterable of batches, optional
        Calibration inputs (tensors or ``(x, y, ...)``); required by the activation criteria.
    k : int, optional
        Channels to keep; required by ``"similarity"`` (one representative per cluster).
    max_images : int
        Images read by the activation criteria.

    Returns
    -------
    float64 array (C,), finite.
    """
    if criterion not in CRITERIA:
        raise InvalidInputError(f"criterion must be one of {list(CRITERIA)}; got {criterion!r}")
    if criterion == "l1":
        return l1_scores(model, group)
    if criterion == "bn_scale":
        return bn_scale_scores(model, group)
    if data is None:
        raise InvalidInputError(f"criterion {criterion!r} needs calibration data; got data=None")
    if criterion == "similarity" and k is None:
        raise InvalidInputError("k (one representative per cluster) must be given for criterion 'similarity'; got k=None")
    stats = activation_statistics(model, group, data, max_images=max_images, need_rank=criterion == "hrank")
    if criterion == "hrank":
        return hrank_scores(stats)
    if criterion == "mean_activation":
        return mean_activation_scores(stats)
    return similarity_scores(stats, k)


# ------------------------------------------------------------------------------------- channel groups
def _unit_matrix(units: np.ndarray, n_units: int) -> np.ndarray:
    """Indicator (n_units, C): channel c counts for unit ``units[c]`` (−1: another group's, none)."""
    M = np.zeros((n_units, units.size))
    mine = np.flatnonzero(units >= 0)
    M[units[mine], mine] = 1.0
    return M


def group_scores(criterion: str, model: nn.Module, group, data: Iterable | None = None, *, k: int | None = None,
                 max_images: int = DEFAULT_IMAGES) -> np.ndarray:
    """Scores (n_units,) of a channel group's units by ``criterion`` (see "Channel groups" in the module
    docstring); higher = keep. ``group``: a :class:`~mipprune.pruning.channel_graph.ChannelGroup` of
    ``model``'s channel graph. Arguments as :func:`channel_scores`."""
    from mipprune.torch_utils import split_batch

    if criterion not in CRITERIA:
        raise InvalidInputError(f"criterion must be one of {list(CRITERIA)}; got {criterion!r}")
    mods = _modules(model)
    n = group.n_units
    if criterion == "l1":
        score = np.zeros(n)
        for m in group.producers:
            w = mods[m.module].weight.detach().to(torch.float64)
            score += _unit_matrix(m.units, n) @ w.abs().reshape(w.shape[0], -1).sum(dim=1).cpu().numpy()
        return score
    if criterion == "bn_scale":
        bns = [m for m in group.members if m.role == "batchnorm" and getattr(mods[m.module], "weight", None) is not None]
        if not bns:
            raise InvalidInputError(f"criterion 'bn_scale' needs an affine BatchNorm in group {group.name!r}; got "
                                    "none (use 'l1' or a solver method such as 'lasso')")
        return sum(_unit_matrix(m.units, n) @ mods[m.module].weight.detach().abs().to(torch.float64).cpu().numpy()
                   for m in bns)
    if data is None:
        raise InvalidInputError(f"criterion {criterion!r} needs calibration data; got data=None")
    if criterion == "similarity" and k is None:
        raise InvalidInputError("k (one representative per cluster) must be given for criterion 'similarity'; got k=None")
    if isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or max_images < 1:
        raise InvalidInputError(f"max_images must be an integer >= 1; got {max_images!r}")
    producers = [m for m in group.producers]
    read = _maps_reader(model, [m.module for m in producers])
    stats = {m.module: ActivationStatistics(m.units.size, criterion == "hrank") for m in producers}
    dev = model_device(model)
    seen = 0
    with evaluation_mode(model):
        for batch in data:
            x, _ = split_batch(batch)
            x = x[: max_images - seen]
            if len(x) == 0:
                break
            for name, maps in read(prepare_input(model, x, dev)).items():
                if maps.ndim < 2 or maps.shape[1] != stats[name].abs_sum.size:
                    raise UnsupportedLayerError(f"post-activation output of {name!r} must have "
                                                f"{stats[name].abs_sum.size} channels in dim 1; got {tuple(maps.shape)}")
                stats[name].add(maps)
            seen += len(x)
            if seen >= max_images:
                break
    if seen == 0:
        raise InvalidInputError("data must yield at least one image; got none")
    per = {"hrank": hrank_scores, "mean_activation": mean_activation_scores}
    if criterion in per:
        return sum(_unit_matrix(m.units, n) @ per[criterion](stats[m.module]) for m in producers)
    units = ActivationStatistics(n, need_rank=False)
    units.n_images = seen
    units.gram = sum(_unit_matrix(m.units, n) @ stats[m.module].gram @ _unit_matrix(m.units, n).T for m in producers)
    return similarity_scores(units, k)
