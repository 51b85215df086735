"""``ChannelSelector``: an sklearn-style selector of the input channels to keep in every prunable layer.

Configure in ``__init__`` (validated there), learn in :meth:`ChannelSelector.fit`, read with
:meth:`~ChannelSelector.get_support` / :meth:`~ChannelSelector.report`, and apply with
:meth:`~ChannelSelector.prune`, which returns a new, physically smaller module (the input model is
never modified).

With ``sequential=True`` (default) fitting follows He, Zhang and Sun (ICCV 2017): the prunable
groups are pruned one after another in forward order; for group *i* the inputs ``Z`` of its
consumer layer come from the model pruned so far while the targets ``Y`` are that layer's outputs
in the *dense* model, so the least-squares refit also absorbs the error of the earlier groups and
errors do not compound.

Methods are those of :func:`solvers.select_channels` (``lasso``, ``exact``, ``greedy``, …), the
importance criteria of :mod:`mipprune.pruning.criteria` (``l1``, ``bn_scale``, ``hrank``,
``mean_activation``, ``similarity``: top-k by score, then the same least-squares refit), and
``tecu`` (block-coordinate descent over the groups, :mod:`mipprune.pruning.tecu`).

Targets: a uniform ``sparsity``, explicit ``k`` per layer, or a network-wide budget ``flops`` /
``params`` (fraction of the dense network's FLOPs / parameters to keep): then every group's error
curve is computed from its selection problem and :func:`solvers.allocate_budget` chooses the widths
(see :mod:`mipprune.pruning.budget`).
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from solvers.errors import InvalidInputError, MipPruneError
from solvers.result import SelectionResult


class NotFittedError(MipPruneError, AttributeError):
    """A fitted attribute or method of a selector was used before :meth:`ChannelSelector.fit`."""


def _known_methods() -> list[str]:
    from mipprune.pruning.criteria import CRITERIA
    from mipprune.pruning.transformer_criteria import TRANSFORMER_CRITERIA
    from solvers.selection.select import METHODS

    return sorted({*METHODS, *CRITERIA, *TRANSFORMER_CRITERIA, "tecu"})


def _fraction(name: str, value, *, closed: bool) -> float:
    """``value`` as a float in (0, 1) (``closed``: (0, 1]), else InvalidInputError."""
    interval = "(0, 1]" if closed else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidInputError(f"{name} must be a number in {interval}; got {value!r}")
    v = float(value)
    if not (0 < v <= 1 if closed else 0 < v < 1):
        raise InvalidInputError(f"{name} must be in {interval}; got {value}")
    return v


def _fingerprint(model: nn.Module) -> str:
    """Hash of the state dict (names, shapes, values): tells whether a model is the one fitted."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled)


class ReportTable(Table):
    """A rich ``Table`` that the built-in ``print`` (``str``) also shows as a table, in plain text."""

    def __str__(self) -> str:
        import io

        from rich.console import Console

        console = Console(file=io.StringIO(), width=100_000, color_system=None, force_terminal=False,
                          force_jupyter=False, force_interactive=False, legacy_windows=False)
        # At its natural width: no squeezed cells, and the caption wraps to the table, not to 80.
        console.width = max(console.measure(self).maximum, 20)
        console.print(self)
        return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip("\n").splitlines())


# Seconds per layer for method "exact" when no time_limit is given: it then stops with TIME_LIMIT and
# the gap it proved instead of running unbounded on a large layer.
EXACT_DEFAULT_TIME_LIMIT = 60.0


class ChannelSelector:
    """Choose the input channels to keep in every prunable layer of a model, by solving for them.

    Parameters
    ----------
    method : str
        A selection method of :func:`solvers.select_channels` (``"lasso"``, ``"exact"``,
        ``"greedy"``, ``"backward"``, ``"magnitude"``, ``"random"``; see ``solvers.selection.select.METHODS``),
        a criterion of :mod:`mipprune.pruning.criteria` (``"l1"``, ``"bn_scale"``, ``"hrank"``,
        ``"mean_activation"``, ``"similarity"``), or ``"tecu"`` (:mod:`mipprune.pruning.tecu`).
    sparsity : float, optional
        Fraction of the channels to *remove* from every prunable group, in (0, 1); a group of C
        channels keeps ``max(1, round(C · (1 − sparsity)))``.
    k : dict, optional
        ``{layer name: channels to keep}``; a layer is named by its consumer (the layer whose input
        channels shrink) or its producer (the layer whose output channels shrink); a name that is a
        consumer always means its own group. Groups not named are left whole.
    flops, params : float, optional
        Fraction of the dense network's FLOPs (multiply-accumulates, as
        :func:`mipprune.train.count_flops` counts them) or parameters (:func:`~mipprune.train.count_params`)
        to *keep*, in (0, 1]. The per-group widths are allocated by :func:`solvers.allocate_budget`
        so that the pruned network lands in ``[(1 − budget_tolerance) · target, target]``; an
        unreachable target raises :class:`~solvers.errors.InfeasibleBudgetError`.
        Give exactly one of ``sparsity``, ``k``, ``flops`` and ``params``.
    backend : str, optional
        Solver backend of the method (``None``: the method's default).
    budget_backend : str
        Backend of the width allocation: ``"highs"`` (MILP) or ``"cpsat"`` (OR-Tools CP-SAT; chains of
        pairs only: channel groups use the HiGHS MILP of :mod:`solvers.polynomial_budget`).
    budget_time_limit : float, optional
        Seconds for the width allocation (channel groups: 30 s when not given; a time limit gives
        status TIME_LIMIT with the proven gap).
    budget_tolerance : float
        Relative window below the target that the allocation must reach (default 0.005).
    positions : int
        Spatial positions sampled per image and convolution by the activation bridge.
    seed : int
        Seed of the position sampling and of randomized methods.
    time_limit : float, optional
        Seconds per layer selection (a method stopped by it reports ``Status.TIME_LIMIT``); for
        ``"tecu"`` the tightest sub-solve time limit. ``"exact"`` defaults to
        ``EXACT_DEFAULT_TIME_LIMIT`` (60 s) per layer, so a large layer cannot run unbounded; the
        others to none.
    max_samples : int, optional
        Cap on the rows of ``Z`` accumulated per layer.
    sequential : bool
        He et al.'s sequential scheme (see the module docstring); ``False`` captures every layer once
        from the dense model and selects all groups independently (faster, errors may compound).
        ``"tecu"`` always recaptures on the pruned prefix.
    max_iter : int
        ``"tecu"``: outer block-coordinate iterations after the initial sequential pass.
    objective : str
        ``"tecu"``: end-to-end objective, ``"output"`` (relative output error against the dense
        network) or ``"task"`` (cross-entropy; the calibration batches must carry labels).
    exact_max_channels : int
        ``"tecu"``: blocks of at most this many channels are solved by ``"exact"``, larger ones by
        greedy + local search.
    gap : float, optional
        ``"exact"``: relative optimality gap at which a layer's selection stops as ``OPTIMAL``
        (``None``: the solver's default 1e-4). Each layer's proven gap is in :meth:`report`.
    method_options : dict, optional
        Keyword arguments of the solver method, passed to every group's selection
        (:func:`solvers.select_channels`'s ``options``), e.g. ``{"workers": 2}`` or ``{"restart": False}`` for
        ``"exact"``. Checked here against what the method takes; criteria and ``"tecu"`` take none.
    device : str, optional
        Device of the forward passes during calibration (``None``: the model's).
    progress : bool
        Show a rich progress bar over calibration and selection.
    groups : str
        ``"auto"`` (default): single producer → consumer pairs (:mod:`mipprune.pruning.graph`) when
        those are all the model has, else channel groups through residual adds, concats, gates,
        depthwise / grouped convolutions and channel shuffles (:mod:`mipprune.pruning.channel_graph`,
        joint selection over each group's consumers: :mod:`mipprune.pruning.group_selector`);
        ``"pairs"`` / ``"graph"`` force one. Over groups, ``layer`` names in ``k``, ``get_support``
        and the report are group names (their producers joined by ``+``) or a producer's name;
        criteria score a group's units summed over its members (:func:`~mipprune.pruning.criteria.group_scores`);
        ``"tecu"`` needs pairs.
    max_memory : int or None
        Bytes one group's float64 statistics may take (estimated before any allocation); a group
        above it is left whole and listed in the report (channel groups and transformer sites; ``None``: no cap).
    allocation : str
        ``flops`` / ``params`` targets on transformers: ``"global"`` (default; non-uniform widths by
        the budget MILP over the sites' error curves) or ``"uniform"`` (the same fraction of every site).

    Transformers (Hugging Face LLaMA / Qwen2 / Mistral / OPT / GPT-2 and the families of
    :mod:`mipprune.pruning.transformer_torch`) are pruned over attention heads (kv groups under
    grouped-query attention) and MLP neurons, block by block: :mod:`mipprune.pruning.transformer_selector`.
    There ``data`` holds token ids (``(B, T)`` tensors or dicts with ``input_ids``), ``params`` counts
    the transformer blocks' parameters, ``flops`` their MACs per token at the calibration length, and
    the criteria ``"magnitude_tp"``, ``"wanda_sp"``, ``"flap"`` are also accepted.

    Attributes (after ``fit``)
    --------------------------
    groups_ : list of mipprune.pruning.graph.PruneGroup, in forward order (all prunable groups).
    masks_ : dict consumer name → bool array (C,), the kept input channels (all True if unpruned).
    results_ : dict consumer name → SelectionResult, for the groups that were pruned.
    pruned_model_ : nn.Module, the pruned, reconstructed copy of the fitted model.
    allocation_ : the :class:`solvers.BudgetResult` of a ``flops`` / ``params`` target (else None); over
        channel groups a :class:`solvers.polynomial_budget.WidthAllocation` (HiGHS MILP, proven gap).
    budget_ : dict (``flops`` / ``params`` targets, else None): metric, target, dense, predicted and
        achieved size, achieved ratio (measured on ``pruned_model_``), window, allocation status,
        objective, bound, gap, time, widths, and how the error curves were computed.
    tecu_history_ : list of dict (``"tecu"`` only): the end-to-end objective per outer iteration.
    graph_ : the :class:`~mipprune.pruning.channel_graph.ChannelGraph` in channel-group mode, else None;
        then ``groups_`` are its prunable ``ChannelGroup`` s, ``masks_`` / ``results_`` are keyed by group
        name (masks over units), and ``skipped_`` names the groups left whole for ``max_memory``.
    """

    def __init__(self, method: str = "lasso", *, sparsity: float | None = None,
                 k: Mapping[str, int] | None = None, flops: float | None = None, params: float | None = None,
                 backend: str | None = None, budget_backend: str = "highs", budget_time_limit: float | None = None,
                 budget_tolerance: float = 0.005, positions: int = 10, seed: int = 0,
                 time_limit: float | None = None, max_samples: int | None = None, sequential: bool = True,
                 max_iter: int = 3, objective: str = "output", exact_max_channels: int = 64,
                 gap: float | None = None, device: str | torch.device | None = None, progress: bool = False,
                 groups: str = "auto", max_memory: int | None = 4 * 2**30, allocation: str = "global",
                 method_options: Mapping[str, Any] | None = None):
        known = _known_methods()
        if not isinstance(method, str) or method not in known:
            raise InvalidInputError(f"method must be one of {known}; got {method!r}")
        given = [n for n, v in (("sparsity", sparsity), ("k", k), ("flops", flops), ("params", params))
                 if v is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise InvalidInputError("exactly one of sparsity (fraction of channels to remove), k (channels "
                                    "to keep per layer), flops or params (fraction of the dense FLOPs / "
                                    f"parameters to keep) must be given; got {got}")
        if sparsity is not None:
            sparsity = _fraction("sparsity", sparsity, closed=False)
        if flops is not None:
            flops = _fraction("flops", flops, closed=True)
        if params is not None:
            params = _fraction("params", params, closed=True)
        if k is not None:
            if not isinstance(k, Mapping) or not k:
                raise InvalidInputError(f"k must be a non-empty dict {{layer name: channels to keep}}; got {k!r}")
            for name, v in k.items():
                if not isinstance(name, str):
                    raise InvalidInputError(f"k keys must be layer names (str); got {name!r}")
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                    raise InvalidInputError(f"k[{name!r}] must be an integer >= 1; got {v!r}")
            k = {name: int(v) for name, v in k.items()}
        if isinstance(positions, bool) or not isinstance(positions, (int, np.integer)) or positions < 1:
            raise InvalidInputError(f"positions must be an integer >= 1; got {positions!r}")
        if time_limit is not None and not time_limit > 0:
            raise InvalidInputError(f"time_limit must be > 0 seconds; got {time_limit}")
        if budget_time_limit is not None and not budget_time_limit > 0:
            raise InvalidInputError(f"budget_time_limit must be > 0 seconds; got {budget_time_limit}")
        if budget_backend not in ("highs", "cpsat"):
            raise InvalidInputError(f"budget_backend must be 'highs' or 'cpsat'; got {budget_backend!r}")
        if not isinstance(budget_tolerance, (int, float)) or not 0 < budget_tolerance < 1:
            raise InvalidInputError(f"budget_tolerance must be in (0, 1); got {budget_tolerance!r}")
        if max_samples is not None and (not isinstance(max_samples, (int, np.integer)) or max_samples < 1):
            raise InvalidInputError(f"max_samples must be an integer >= 1; got {max_samples!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
            raise InvalidInputError(f"max_iter must be an integer >= 0; got {max_iter!r}")
        if objective not in ("output", "task"):
            raise InvalidInputError(f"objective must be 'output' or 'task'; got {objective!r}")
        if isinstance(exact_max_channels, bool) or not isinstance(exact_max_channels, (int, np.integer)) \
                or exact_max_channels < 0:
            raise InvalidInputError(f"exact_max_channels must be an integer >= 0; got {exact_max_channels!r}")
        from solvers.selection.select import METHODS, check_gap, check_options

        self.gap = check_gap(gap, method)
        if method_options is not None:
            if method in METHODS:
                method_options = check_options(method_options, method)
            elif method_options:
                raise InvalidInputError(f"method_options are keyword arguments of a solver method ({', '.join(METHODS)}); "
                                        f"method {method!r} takes none")
        self.method_options = dict(method_options or {})
        self.method = method
        self.sparsity = sparsity
        self.k = k
        self.flops = flops
        self.params = params
        self.backend = backend
        self.budget_backend = budget_backend
        self.budget_time_limit = budget_time_limit
        self.budget_tolerance = float(budget_tolerance)
        self.positions = int(positions)
        self.seed = int(seed)
        self.time_limit = EXACT_DEFAULT_TIME_LIMIT if time_limit is None and method == "exact" else time_limit
        self.max_samples = max_samples
        self.sequential = bool(sequential)
        self.max_iter = int(max_iter)
        self.objective = objective
        self.exact_max_channels = int(exact_max_channels)
        self.device = device
        self.progress = bool(progress)
        from mipprune.pruning.group_selector import GROUP_MODES

        if groups not in GROUP_MODES:
            raise InvalidInputError(f"groups must be one of {list(GROUP_MODES)}; got {groups!r}")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, np.integer))
                                       or max_memory < 1):
            raise InvalidInputError(f"max_memory must be a number of bytes >= 1 or None; got {max_memory!r}")
        self.groups = groups
        self.max_memory = None if max_memory is None else int(max_memory)
        if allocation not in ("global", "uniform"):
            raise InvalidInputError(f"allocation must be 'global' or 'uniform'; got {allocation!r}")
        self.allocation = allocation

    def _target_repr(self) -> str:
        for name in ("sparsity", "k", "flops", "params"):
            if getattr(self, name) is not None:
                return f"{name}={getattr(self, name)}"
        return ""  # pragma: no cover - the constructor requires one

    def __repr__(self) -> str:
        return (f"ChannelSelector(method={self.method!r}, {self._target_repr()}, backend={self.backend!r}, "
                f"sequential={self.sequential})")

    # ------------------------------------------------------------------------------------ fitting
    def _targets(self, groups) -> dict[str, int]:
        """Channels to keep per consumer name, for the groups to prune (validated against the model)."""
        if self.sparsity is not None:
            return {g.consumer: max(1, math.floor(g.n_channels * (1.0 - self.sparsity) + 0.5)) for g in groups}
        by_name = {}
        for g in groups:
            by_name[g.consumer] = g
            by_name.setdefault(g.producer, g)
        out: dict[str, int] = {}
        for name, v in self.k.items():
            if name not in by_name:
                known = [g.consumer for g in groups]
                raise InvalidInputError(f"k keys must be prunable layers (consumer names {known}, or "
                                        f"their producers); got {name!r}")
            g = by_name[name]
            if not 1 <= v <= g.n_channels:
                raise InvalidInputError(f"k[{name!r}] must satisfy 1 <= k <= {g.n_channels} (channels of "
                                        f"{g.consumer!r}); got {v}")
            if g.consumer in out and out[g.consumer] != v:
                raise InvalidInputError(f"k names the group of {g.consumer!r} twice with different values; "
                                        f"got {out[g.consumer]} and {v}")
            out[g.consumer] = v
        return out

    def _select(self, problem, k: int, group, model: nn.Module, data) -> SelectionResult:
        """One group's selection: a solver method, or a criterion's top-k followed by the refit."""
        from mipprune.pruning.criteria import CRITERIA, channel_scores
        from solvers.selection.baselines import select_by_scores
        from solvers.selection.select import select_channels

        if self.method in CRITERIA:
            start = time.perf_counter()
            scores = channel_scores(self.method, model, group, data, k=k)
            return select_by_scores(problem, scores, k, method=self.method, start=start,
                                    info={"scores": scores})
        return select_channels(problem, k=k, method=self.method, backend=self.backend,
                               time_limit=self.time_limit, seed=self.seed, gap=self.gap,
                               options=self.method_options)

    def fit(self, model: nn.Module, data: Iterable) -> "ChannelSelector":
        """Calibrate on ``data`` and choose the channels to keep; ``model`` is not modified.

        Parameters
        ----------
        model : nn.Module
            A trained model (its train/eval flags and weights are left as they were).
        data : iterable of batches
            Tensors ``x`` or sequences ``(x, y, ...)`` of the model's inputs (labels are ignored,
            except by ``method="tecu"`` with ``objective="task"``), e.g. a DataLoader; a one-shot
            iterator is consumed into a list. Must not be empty.
        """
        from mipprune.pruning.graph import find_prune_groups
        from mipprune.pruning.bridge import capture, run_calibration_batch
        from mipprune.pruning.surgery import prune_channels
        from mipprune.torch_utils import eval_mode, model_device, reiterable, resolve_device, split_batch

        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        data = reiterable(data)
        from mipprune.pruning.transformer_sites import find_adapter

        self.sites_ = None
        adapter = find_adapter(model)
        if adapter is not None:  # attention heads and MLP neurons, block by block
            from mipprune.pruning.transformer_selector import fit_transformer

            return fit_transformer(self, model, data, adapter, fingerprint=_fingerprint, progress=_progress)
        x0, _ = split_batch(next(iter(data)))
        if x0.ndim < 1 or len(x0) == 0:
            raise InvalidInputError(f"the first batch must hold at least one sample; got shape {tuple(x0.shape)}")
        start = time.perf_counter()
        home = model_device(model)
        dev = resolve_device(self.device, model)
        # Work on the calibration device; the user's model is only read (copied if it lives elsewhere).
        dense = model if dev == home else copy.deepcopy(model).to(dev)
        example = x0[:1].detach().to(dev)
        with eval_mode(dense), torch.no_grad():
            run_calibration_batch(dense, x0, 0, dev, probe=True)   # a wrong shape or NaN told as such, first
            from mipprune.pruning.group_selector import use_graph

            graph = use_graph(self, dense, example)
            groups = [] if graph is not None else list(find_prune_groups(dense, example))
        if graph is not None:  # residual adds, concats, gates, grouped convs …: joint selection per group
            from mipprune.pruning.group_selector import fit_graph

            return fit_graph(self, model, dense, data, example, graph, home, start, fingerprint=_fingerprint,
                             progress=_progress)
        self.graph_ = None
        if not groups:
            why = f". Channel groups were not analysed: {self.trace_error_}" if getattr(self, "trace_error_", None) else ""
            raise InvalidInputError("model must have at least one prunable channel group (a Conv2d/Linear "
                                    "whose outputs feed another Conv2d/Linear); got none" + why)
        allocation, budget = None, None
        if self.flops is not None or self.params is not None:
            from mipprune.pruning.budget import allocate_widths

            metric = "flops" if self.flops is not None else "params"
            target = self.flops if self.flops is not None else self.params
            plan = allocate_widths(dense, data, groups, example, metric=metric, target=target,
                                   backend=self.budget_backend, time_limit=self.budget_time_limit,
                                   tolerance=self.budget_tolerance, positions=self.positions,
                                   max_samples=self.max_samples, seed=self.seed)
            targets, allocation, budget = plan.widths, plan.allocation, plan.summary
            # groups left at full width are not "pruned": no selection, no report row
            targets = {c: v for c, v in targets.items() if v < next(g.n_channels for g in groups if g.consumer == c)}
        else:
            targets = self._targets(groups)
        todo = [g for g in groups if g.consumer in targets]
        if self.method == "bn_scale":  # fail before any calibration work
            from mipprune.pruning.criteria import bn_scale_scores

            for g in todo:
                bn_scale_scores(dense, g)
        results: dict[str, SelectionResult] = {}
        rows: dict[str, dict] = {}
        current = dense
        history = None
        with _progress(self.progress) as bar:
            if self.method == "tecu" and todo:
                from mipprune.pruning.tecu import tecu

                task = bar.add_task("TECU", total=None)
                outcome = tecu(dense, data, groups, targets, example=example, max_iter=self.max_iter,
                               objective=self.objective, exact_max_channels=self.exact_max_channels,
                               time_limit=self.time_limit, positions=self.positions,
                               max_samples=self.max_samples, seed=self.seed, backend=self.backend,
                               on_step=lambda msg: bar.update(task, description=f"TECU {msg}"))
                results, rows, current, history = outcome.results, outcome.rows, outcome.model, outcome.history
                bar.update(task, total=1, completed=1)
            else:
                task = bar.add_task("calibrating", total=2 * len(todo))
                if not self.sequential and todo:
                    bar.update(task, description=f"calibrating {len(todo)} layers")
                    t0 = time.perf_counter()
                    all_stats = capture(dense, data, [g.consumer for g in todo], positions=self.positions,
                                        max_samples=self.max_samples,
                                        columns_per_channel={g.consumer: g.columns_per_channel for g in todo},
                                        seed=self.seed)
                    capture_time = (time.perf_counter() - t0) / len(todo)
                    bar.advance(task, len(todo))
                for i, g in enumerate(todo):
                    if self.sequential:
                        bar.update(task, description=f"calibrating {g.consumer}")
                        t0 = time.perf_counter()
                        # Z from the model pruned so far; Y from the dense model (the same for i = 0).
                        stats = capture(current, data, [g.consumer], positions=self.positions,
                                        max_samples=self.max_samples, target=dense if i > 0 else None,
                                        columns_per_channel={g.consumer: g.columns_per_channel},
                                        seed=self.seed)[g.consumer]
                        capture_time = time.perf_counter() - t0
                        bar.advance(task)
                    else:
                        stats = all_stats[g.consumer]
                    bar.update(task, description=f"selecting {g.consumer} ({self.method})")
                    problem = stats.problem()
                    res = self._select(problem, targets[g.consumer], g, current if self.sequential else dense,
                                       data)
                    results[g.consumer] = res
                    rows[g.consumer] = {"error_no_refit": problem.error(res.mask, refit=False),
                                        "capture_time": capture_time, "n_samples": int(stats.n_samples)}
                    bar.advance(task)
                    if self.sequential:
                        current = prune_channels(current, {g.consumer: (res.mask, res.weights)}, example)
                if not self.sequential:
                    current = self._apply(dense, results, groups, example, reconstruct=True)
        if current is dense:  # nothing pruned (e.g. a budget of 1): still our own copy
            current = copy.deepcopy(dense)
        self.groups_ = groups
        mods = dict(dense.named_modules())
        self._types = {g.consumer: type(mods[g.consumer]).__name__ for g in groups}
        self.masks_ = {g.consumer: (results[g.consumer].mask.copy() if g.consumer in results
                                    else np.ones(g.n_channels, dtype=bool)) for g in groups}
        self.results_ = results
        self._rows = rows
        self.allocation_ = allocation
        if budget is not None:
            from mipprune.pruning.budget import measure

            budget = measure(budget, current, example)
        self.budget_ = budget
        self.tecu_history_ = history
        self.pruned_model_ = current.to(home)  # our own copy: moving it is safe
        self.example_input_ = example.cpu()
        self.fit_time_ = time.perf_counter() - start
        self._fitted_id = id(model)
        self._fitted_fingerprint = _fingerprint(model)
        return self

    # ------------------------------------------------------------------------------------ reading
    def _check_fitted(self) -> None:
        if not hasattr(self, "results_"):
            raise NotFittedError("this ChannelSelector is not fitted yet; call fit(model, data) first")

    def _group_of(self, layer: str):
        self._check_fitted()
        for g in self.groups_:
            if layer == g.consumer:
                return g
        for g in self.groups_:
            if layer == g.producer:
                return g
        known = [g.consumer for g in self.groups_]
        raise InvalidInputError(f"layer must be a prunable layer (consumer names {known}, or their "
                                f"producers); got {layer!r}")

    def get_support(self, layer: str) -> np.ndarray:
        """Bool mask (C,) of the kept input channels of consumer ``layer`` (or of the group whose
        producer is ``layer``); all ``True`` for a group that was not pruned."""
        if getattr(self, "sites_", None) is not None:
            from mipprune.pruning.transformer_selector import transformer_support

            return transformer_support(self, layer)
        if getattr(self, "graph_", None) is not None:
            from mipprune.pruning.group_selector import graph_support

            return graph_support(self, layer)
        group = self._group_of(layer)
        return self.masks_[group.consumer].copy()

    def report_rows(self) -> list[dict]:
        """One dict per pruned group, in forward order: layer (consumer name), type (its class
        name), producer, kept, total, rel_error
        (relative reconstruction error after refit, on the calibration data), error_no_refit (the
        same mask with the old weights), bound, gap, status, method, backend, solve_time and
        capture_time (seconds), n_samples (rows of Z)."""
        self._check_fitted()
        if getattr(self, "sites_", None) is not None:
            from mipprune.pruning.transformer_selector import transformer_report_rows

            return transformer_report_rows(self)
        if getattr(self, "graph_", None) is not None:
            from mipprune.pruning.group_selector import graph_report_rows

            return graph_report_rows(self)
        rows = []
        for g in self.groups_:
            res = self.results_.get(g.consumer)
            if res is None:
                continue
            extra = self._rows[g.consumer]
            rows.append({
                "layer": g.consumer, "type": self._types[g.consumer], "producer": g.producer,
                "kept": res.k, "total": g.n_channels,
                "rel_error": float(res.objective), "error_no_refit": float(extra["error_no_refit"]),
                "bound": res.bound, "gap": res.gap, "status": str(res.status.value), "method": res.method,
                "backend": res.backend, "solve_time": float(res.solve_time),
                "capture_time": float(extra["capture_time"]), "n_samples": extra["n_samples"],
            })
        return rows

    def report(self):
        """A ``rich.table.Table`` of :meth:`report_rows`: ``rich.print(sel.report())`` prints it in
        colour, the built-in ``print`` (or ``str``) as plain text at the width it needs."""
        if getattr(self, "sites_", None) is not None:
            from mipprune.pruning.transformer_selector import transformer_report

            return transformer_report(self, ReportTable)
        mode = "block-coordinate" if self.method == "tecu" else "sequential" if self.sequential else "one-shot"
        table = ReportTable(title=f"Channel selection (method {self.method}, {self._target_repr()}, {mode})")
        for col, just in [("layer", "left"), ("type", "left"), ("kept", "right"),
                          ("rel. error", "right"), ("no refit", "right"), ("bound", "right"), ("gap", "right"),
                          ("time s", "right"),
                          ("status", "left")]:
            table.add_column(col, justify=just, no_wrap=True)
        for r in self.report_rows():
            gap = "-" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
            table.add_row(r["layer"], r["type"], f"{r['kept']}/{r['total']}", f"{r['rel_error']:.4f}",
                          f"{r['error_no_refit']:.4f}", "-" if r["bound"] is None else f"{r['bound']:.4f}", gap,
                          f"{r['solve_time']:.2f}", r["status"])
        table.caption = ("rel. error: ‖Y − Ŷ‖²/‖Y‖² of the layer output after the least-squares refit, on the "
                         "calibration data; no refit: same channels, old weights; bound: proven lower bound on the "
                         "optimal rel. error (certifying methods only); gap: proven optimality gap")
        if getattr(self, "graph_", None) is not None:
            from mipprune.pruning.group_selector import graph_caption

            table.caption += "\n" + graph_caption(self)
        elif self.budget_ is not None:
            b, a = self.budget_, self.budget_["allocation"]
            gap = "-" if a["gap"] is None else f"{100 * a['gap']:.2f}%"
            lo, hi = b["window"]
            table.caption += (f"\n{b['metric']} budget {b['target']:g}: achieved {b['achieved_ratio']:.4f} of dense "
                              f"({'in' if b['in_window'] else 'OUTSIDE'} [{lo:.4f}, {hi:.4f}]); "
                              f"allocation ({a['backend']}) {a['status']}, Σ err {a['objective']:.4g}, gap {gap}")
        if getattr(self, "trace_error_", None):
            table.caption += f"\nchannel groups not analysed (pairs of layers only): {self.trace_error_}"
        if self.tecu_history_ is not None:
            steps = " → ".join(f"{h['objective']:.4g}" for h in self.tecu_history_)
            table.caption += f"\nTECU end-to-end objective per iteration: {steps}"
        return table

    # ------------------------------------------------------------------------------------ pruning
    def _apply(self, model, results, groups, example, *, reconstruct: bool) -> nn.Module:
        """Surgery group by group in forward order (each consumer still has its full outputs when its
        own weights, fitted with full outputs, are written)."""
        from mipprune.pruning.surgery import prune_channels

        current = model
        for g in groups:
            res = results.get(g.consumer)
            if res is None:
                continue
            current = prune_channels(current, {g.consumer: (res.mask, res.weights if reconstruct else None)},
                                     example)
        if current is model:  # nothing pruned: still hand back a copy
            current = copy.deepcopy(model)
        return current

    def prune(self, model: nn.Module, *, reconstruct: bool = True) -> nn.Module:
        """A new module with the unselected channels removed; ``model`` is left untouched.

        On the fitted model itself (same object, same weights) this is a fresh copy of
        ``pruned_model_``. On another model of the same architecture the stored masks and
        reconstructed weights are applied by surgery. ``reconstruct=False`` keeps the model's own
        weights, sliced to the kept channels (mask only, no least-squares refit).
        """
        from mipprune.pruning.graph import find_prune_groups
        from mipprune.torch_utils import eval_mode, model_device, prepare_input

        self._check_fitted()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if reconstruct and id(model) == self._fitted_id and _fingerprint(model) == self._fitted_fingerprint:
            return copy.deepcopy(self.pruned_model_)
        if getattr(self, "sites_", None) is not None:
            from mipprune.pruning.transformer_selector import transformer_prune

            return transformer_prune(self, model, reconstruct)
        if getattr(self, "graph_", None) is not None:
            from mipprune.pruning.group_selector import graph_prune

            return graph_prune(self, model, reconstruct)
        example = self.example_input_.to(model_device(model))
        with eval_mode(model), torch.no_grad():
            try:   # said in this call's terms before the graph analysis says "example_input"
                model(prepare_input(model, example))
            except Exception as exc:
                raise InvalidInputError(
                    f"model must have the architecture of the fitted one and take its calibration input "
                    f"(one sample of shape {tuple(example.shape)}); got {type(exc).__name__}: {exc}") from exc
            try:
                groups = list(find_prune_groups(model, example))
            except MipPruneError:
                raise
            except Exception as exc:  # e.g. a shape mismatch in the forward
                raise InvalidInputError(f"model must have the architecture of the fitted one; got an error "
                                        f"running it on the calibration input: {exc}") from exc
        sig = [(g.consumer, g.producer, g.n_channels) for g in groups]
        want = [(g.consumer, g.producer, g.n_channels) for g in self.groups_]
        if sig != want:
            raise InvalidInputError(f"model must have the prunable groups of the fitted one {want}; got {sig}")
        return self._apply(model, self.results_, self.groups_, example, reconstruct=reconstruct)


__all__ = ["ChannelSelector", "NotFittedError"]
