"""The headline experiment: pruning speeds up adversarial-example MILPs.

Following Cacciola, Frangioni and Lodi (arXiv 2307.07457): train fully-connected ReLU networks,
prune each at several sparsities with several methods (structured channel selection with
reconstruction, and unstructured magnitude pruning of weights), and on test images pose the query
"is there an x in the L∞ / L1 ball whose predicted class differs?" (:meth:`solvers.Spec.robustness`)
as a MILP on the dense and on every pruned network, under a per-query time limit. Measured per
network: test accuracy, MILP size, bound time, solve time, verdicts and the speed-up over the dense
network on the same queries.

Following Pham et al. (arXiv 2505.01985), a pruned network is also used as a *surrogate*: the
counterexamples its MILP finds are re-checked on the dense network (float64 forward); a dense query
that timed out is settled (falsified, for the dense net) only when that re-check passes.

Pipeline: :func:`load_config` → :func:`run_experiment` (train → prune → export → queries on an
executor, appended one by one to ``queries.jsonl`` so runs resume → surrogate check → aggregation)
→ :mod:`mipprune.experiment_report` (tables, CSV/JSON, figures, report.md).

The torch imports live inside the functions that need them, so that pool workers (which import
only :mod:`mipprune.executors`) and config validation stay torch-free and fast.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from solvers.errors import InvalidInputError

UNSTRUCTURED = "unstructured"
RADIUS_MODES = ("calibrated", "fixed")
NORMS = ("linf", "l1")
SOLVED = ("verified", "falsified")


# ============================================================================ configuration
@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on (see ``mipprune/configs/default.toml`` for the meaning of each).

    Accuracy drops are in points (percent of the test set); times in seconds; ``eps_linf`` and
    ``eps_l1`` are radii in pixel units (pixels in [0, 1]). ``radius = "calibrated"`` sets each
    image's radius to ``radius_fraction`` × the smallest radius at which PGD finds an adversarial
    example on the dense network (bisection); ``"fixed"`` uses ``eps_linf`` / ``eps_l1``.
    """

    seed: int = 0
    dataset: str = "digits"
    test_size: float = 0.25
    architectures: tuple = ((100, 100), (200, 200, 200))
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64
    methods: tuple = ("lasso", "greedy", "magnitude", "random", "unstructured")
    sparsities: tuple = (0.7, 0.85)
    finetune_epochs: int = 3
    calibration: int = 512
    selection_time_limit: float = 10.0
    n_images: int = 4
    norms: tuple = ("linf", "l1")
    radius: str = "calibrated"
    radius_fraction: float = 0.8
    calibration_time: float = 0.5
    eps_linf: float = 0.05
    eps_l1: float = 1.0
    time_limit: float = 10.0
    backend: str = "highs"
    verify_options: dict = field(default_factory=dict)
    surrogate: bool = True
    surrogate_pgd: bool = True
    pgd_time_limit: float = 2.0
    max_accuracy_drop: float = 1.0
    export_onnx: bool = True
    jobs: int = 2
    executor: str = "local"

    def __post_init__(self):
        validate_config(self)

    def replace(self, **changes) -> "ExperimentConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def fixed_eps(self, norm: str) -> float:
        return self.eps_linf if norm == "linf" else self.eps_l1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = [list(a) for a in self.architectures]
        for k in ("methods", "sparsities", "norms"):
            d[k] = list(d[k])
        return d


# TOML "section.key" -> field name (the file layout of configs/default.toml)
_TOML_FIELDS = {
    "experiment.seed": "seed", "experiment.dataset": "dataset",
    "data.test_size": "test_size",
    "train.architectures": "architectures", "train.epochs": "epochs", "train.lr": "lr",
    "train.batch_size": "batch_size",
    "prune.methods": "methods", "prune.sparsities": "sparsities",
    "prune.finetune_epochs": "finetune_epochs", "prune.calibration": "calibration",
    "prune.selection_time_limit": "selection_time_limit",
    "verify.n_images": "n_images", "verify.norms": "norms", "verify.radius": "radius",
    "verify.radius_fraction": "radius_fraction", "verify.calibration_time": "calibration_time",
    "verify.eps_linf": "eps_linf",
    "verify.eps_l1": "eps_l1", "verify.time_limit": "time_limit", "verify.backend": "backend",
    "verify.options": "verify_options",
    "surrogate.enabled": "surrogate", "surrogate.pgd": "surrogate_pgd",
    "surrogate.pgd_time_limit": "pgd_time_limit",
    "report.max_accuracy_drop": "max_accuracy_drop", "report.export_onnx": "export_onnx",
    "run.jobs": "jobs", "run.executor": "executor",
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def known_methods() -> tuple:
    """Pruning methods a config may name: every channel-selection method of
    :data:`solvers.select.METHODS` (structured) and ``"unstructured"``."""
    from solvers.select import METHODS

    return tuple(sorted(METHODS)) + (UNSTRUCTURED,)


def _valid_arch(a: list) -> bool:
    """Conv items (``"c8"``, ``"c16s2"``) first, then positive integer widths."""
    from mipprune.models import parse_conv_item

    n_conv = 0
    while n_conv < len(a) and parse_conv_item(a[n_conv]) is not None:
        n_conv += 1
    return all(_is_int(w) and w >= 1 for w in a[n_conv:])


def is_conv_arch(hidden: tuple) -> bool:
    return any(isinstance(w, str) for w in hidden)


def validate_config(c: ExperimentConfig) -> None:
    """Raise ``InvalidInputError`` ("x must be …; got …") for any out-of-range setting.

    Normalises sequences to tuples in place (the dataclass is frozen, so via ``object.__setattr__``).
    """
    def put(name, value):
        object.__setattr__(c, name, value)

    if not _is_int(c.seed):
        raise InvalidInputError(f"seed must be an integer; got {c.seed!r}")
    if c.dataset != "digits":
        raise InvalidInputError(f"dataset must be 'digits'; got {c.dataset!r}")
    if not (_is_num(c.test_size) and 0 < c.test_size < 1):
        raise InvalidInputError(f"test_size must be in (0, 1); got {c.test_size!r}")
    archs = c.architectures
    if isinstance(archs, (str, bytes)) or not hasattr(archs, "__iter__") or not list(archs):
        raise InvalidInputError(f"architectures must be a non-empty list of hidden-width lists; got {archs!r}")
    norm_archs = []
    for a in archs:
        a = list(a) if hasattr(a, "__iter__") and not isinstance(a, (str, bytes)) else a
        if not isinstance(a, list) or not a or not _valid_arch(a):
            raise InvalidInputError(f"each architecture must be a non-empty list of positive hidden widths, "
                                    f"optionally after conv items like 'c8' or 'c16s2'; got {a!r}")
        norm_archs.append(tuple(w if isinstance(w, str) else int(w) for w in a))
    if len(set(norm_archs)) != len(norm_archs):
        raise InvalidInputError(f"architectures must be distinct; got {[list(a) for a in norm_archs]}")
    put("architectures", tuple(norm_archs))
    for name, lo in (("epochs", 0), ("batch_size", 1), ("finetune_epochs", 0), ("calibration", 1),
                     ("n_images", 1), ("jobs", 1)):
        v = getattr(c, name)
        if not (_is_int(v) and v >= lo):
            raise InvalidInputError(f"{name} must be an integer >= {lo}; got {v!r}")
    if c.radius not in RADIUS_MODES:
        raise InvalidInputError(f"radius must be one of {list(RADIUS_MODES)}; got {c.radius!r}")
    if not (_is_num(c.radius_fraction) and 0 < c.radius_fraction <= 1):
        raise InvalidInputError(f"radius_fraction must be in (0, 1]; got {c.radius_fraction!r}")
    for name in ("lr", "eps_linf", "eps_l1", "time_limit", "pgd_time_limit", "calibration_time",
                 "selection_time_limit"):
        v = getattr(c, name)
        if not (_is_num(v) and math.isfinite(v) and v > 0):
            raise InvalidInputError(f"{name} must be a number > 0; got {v!r}")
    if not (_is_num(c.max_accuracy_drop) and c.max_accuracy_drop >= 0):
        raise InvalidInputError(f"max_accuracy_drop must be a number >= 0 (points); got {c.max_accuracy_drop!r}")
    methods = tuple(c.methods) if not isinstance(c.methods, str) else (c.methods,)
    known = known_methods()
    if not methods:
        raise InvalidInputError(f"methods must name at least one of {list(known)}; got none")
    for m in methods:
        if m not in known:
            raise InvalidInputError(f"method must be one of {list(known)}; got {m!r}")
    if len(set(methods)) != len(methods):
        raise InvalidInputError(f"methods must be distinct; got {list(methods)}")
    put("methods", methods)
    sp = tuple(c.sparsities) if hasattr(c.sparsities, "__iter__") else (c.sparsities,)
    if not sp:
        raise InvalidInputError("sparsities must hold at least one value in (0, 1); got none")
    for s in sp:
        if not (_is_num(s) and 0 < s < 1):
            raise InvalidInputError(f"sparsity must be in (0, 1); got {s!r}")
    put("sparsities", tuple(sorted({float(s) for s in sp})))
    norms = tuple(c.norms) if not isinstance(c.norms, str) else (c.norms,)
    if not norms or any(n not in NORMS for n in norms):
        raise InvalidInputError(f"norms must be a non-empty list of {list(NORMS)}; got {list(norms)}")
    put("norms", tuple(dict.fromkeys(norms)))
    if not isinstance(c.verify_options, dict):
        raise InvalidInputError(f"verify_options must be a table of keyword arguments; got {c.verify_options!r}")
    from mipprune.executors import EXECUTORS

    if c.executor not in EXECUTORS:
        raise InvalidInputError(f"executor must be one of {list(EXECUTORS)}; got {c.executor!r}")
    if not isinstance(c.backend, str):
        raise InvalidInputError(f"backend must be a solver name; got {c.backend!r}")
    for name in ("surrogate", "surrogate_pgd", "export_onnx"):
        if not isinstance(getattr(c, name), bool):
            raise InvalidInputError(f"{name} must be true or false; got {getattr(c, name)!r}")


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidInputError(f"config file must exist; got {str(path)!r} (not found)") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"config file must be valid TOML; got {str(path)!r}: {exc}") from None


def _flatten(doc: dict, where: str) -> dict:
    """``{"train": {"epochs": 3}}`` → ``{"epochs": 3}`` (field names), rejecting unknown keys."""
    out: dict = {}
    for section, table in doc.items():
        if section == "quick":
            continue
        if not isinstance(table, dict):
            raise InvalidInputError(f"{where}: top-level entries must be tables like [train]; "
                                    f"got {section!r} = {table!r}")
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if dotted not in _TOML_FIELDS:
                raise InvalidInputError(f"{where}: key must be one of {sorted(_TOML_FIELDS)}; got {dotted!r}")
            out[_TOML_FIELDS[dotted]] = value
    return out


def default_config_path():
    """The embedded default configuration (a ``Traversable`` inside the package)."""
    return resources.files("mipprune") / "configs" / "default.toml"


def load_config(path: str | os.PathLike | None = None, *, quick: bool = False,
                overrides: dict | None = None) -> ExperimentConfig:
    """The embedded default configuration, updated by the TOML file ``path`` (if given), then by the
    file's (or the default's) ``[quick.*]`` tables when ``quick``, then by ``overrides`` (field names).

    Raises ``InvalidInputError`` for a missing file, invalid TOML, an unknown key or a bad value.
    """
    import tomllib

    with resources.as_file(default_config_path()) as p:
        base = tomllib.loads(Path(p).read_text())
    values = _flatten(base, "default config")
    quick_tables = base.get("quick", {})
    if path is not None:
        user = _read_toml(Path(path))
        values.update(_flatten(user, str(path)))
        if "quick" in user:
            quick_tables = user["quick"]
    if quick:
        values.update(_flatten(quick_tables, "[quick]"))
    values.update(overrides or {})
    unknown = set(values) - {f.name for f in dataclasses.fields(ExperimentConfig)}
    if unknown:
        raise InvalidInputError(f"overrides must be config fields; got {sorted(unknown)}")
    return ExperimentConfig(**values)


# ============================================================================ result store (resume)
class ResultStore:
    """Rows of finished queries in a JSONL file, appended (and fsync'ed) one by one.

    On open the existing rows are read back; a torn last line (a crash mid-write) is ignored. A row
    counts as done for a job only if its ``fingerprint`` matches (a changed config recomputes).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[row["key"]] = row   # a later row of the same key wins

    def done(self, key: str, fingerprint: str) -> bool:
        row = self.rows.get(key)
        return row is not None and row.get("fingerprint") == fingerprint

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row


# ============================================================================ networks
def arch_label(hidden: tuple) -> str:
    """``(100, 100, 100)`` → ``"3x100"``; mixed widths → ``"50-100"``; conv → ``"c8-c16s2-64"``."""
    if len(set(hidden)) == 1 and not is_conv_arch(hidden):
        return f"{len(hidden)}x{hidden[0]}"
    return "-".join(map(str, hidden))


def _hash(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


@dataclass
class NetEntry:
    """One network of the run (dense or pruned). ``accuracy`` in [0, 1]; ``network`` is the
    solvers.Network the MILPs are built from; ``model`` the torch module (main process only)."""

    net_id: str
    arch: str
    hidden: tuple
    method: str            # "dense" or a pruning method
    sparsity: float        # 0 for dense
    fingerprint: str
    accuracy: float
    params: int            # non-zero weights and biases
    neurons: int           # hidden ReLU neurons
    network: Any = None
    model: Any = None
    onnx: str | None = None
    prune_time: float = 0.0

    @property
    def file_stem(self) -> str:
        return self.net_id.replace("/", "_")

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("net_id", "arch", "method", "sparsity", "accuracy", "params",
                                              "neurons", "fingerprint", "onnx", "prune_time")}


def _nonzero_params(model) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def _hidden_neurons(network) -> int:
    return int(sum(b.shape[0] for b in network.to_affine_relu()[:-1]))


def _unstructured_prune(model, sparsity: float):
    """Copy of ``model`` with the ``sparsity`` fraction of smallest-magnitude weights of every Linear
    and Conv2d layer but the output layer zeroed (``torch.nn.utils.prune.l1_unstructured``, made
    permanent). The output layer is left whole: it is small and carries no ReLU (no MILP binaries)."""
    import copy

    from torch import nn
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    for m in [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]:
        prune.l1_unstructured(m, "weight", amount=sparsity)
        prune.remove(m, "weight")
    return pruned


def _finetune_keeping_zeros(pruned, dense, loader, cfg: ExperimentConfig):
    """KD fine-tuning (:func:`mipprune.train.finetune`) under which zero weights stay zero: each Linear
    or Conv2d weight is parametrized as ``W ⊙ mask`` (``torch.nn.utils.parametrize``; mask = the non-zeros
    before fine-tuning), so pruned weights get no update; the parametrization is then folded in."""
    import copy

    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from mipprune.train import finetune

    class _Mask(nn.Module):
        def __init__(self, mask: torch.Tensor):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.mask

    student = copy.deepcopy(pruned)   # finetune's own deepcopy leaves a parametrized original unusable
    for m in student.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and bool((m.weight == 0).any()):
            parametrize.register_parametrization(m, "weight", _Mask((m.weight != 0).to(m.weight.dtype)))
    tuned = finetune(student, dense, loader, epochs=cfg.finetune_epochs, seed=cfg.seed)
    for m in tuned.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return tuned


def export_onnx(model, path: Path, input_shape: tuple) -> None:
    """Single-file ONNX of ``model`` (weights embedded, ``external_data=False``).

    The TorchScript exporter first: on these MLPs it writes the same Gemm/Relu graph as the dynamo
    exporter about 60× faster (0.06 s vs 4 s per model measured here, which would be a quarter of the
    default run); the dynamo exporter is the fallback for torch versions without the TorchScript one.
    """
    import contextlib
    import io
    import logging
    import warnings

    import torch

    dummy = torch.zeros((1, *input_shape))
    kw = dict(input_names=["input"], output_names=["output"], external_data=False)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, **kw)
        except Exception:
            torch.onnx.export(model, (dummy,), str(path), dynamo=True, verbose=False, **kw)


def _load_cached(path: Path, meta_path: Path, fingerprint: str):
    import torch

    if not (path.exists() and meta_path.exists()):
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None, None
    if meta.get("fingerprint") != fingerprint:
        return None, None
    return torch.load(path, weights_only=False), meta   # our own file, written by _save_cached


def _save_cached(model, path: Path, meta_path: Path, meta: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    meta_path.write_text(json.dumps(meta, indent=1))


def prepare_networks(cfg: ExperimentConfig, out: Path, *, log=print) -> tuple[list[NetEntry], Any]:
    """Train (or load from ``out/models``) every dense net, prune it with every method and sparsity,
    convert each to a solvers.Network and export it to ONNX. Returns ``(entries, data)``."""
    import torch

    from mipprune.data import DIGITS_FLAT_SHAPE, DIGITS_IMAGE_SHAPE, load_digits_data, make_loader
    from mipprune.export import to_network
    from mipprune.models import conv_mlp, mlp
    from mipprune.train import evaluate, train_classifier

    # Inputs are flat (N, 64) everywhere (queries, specs, VNN-LIB); conv nets see them as (N, 1, 8, 8).
    data = load_digits_data(seed=cfg.seed, test_size=cfg.test_size, flat=True)
    rng = np.random.default_rng(cfg.seed)
    calib_idx = np.sort(rng.permutation(len(data.x_train))[: cfg.calibration])
    shape = DIGITS_FLAT_SHAPE

    def shaped(x):
        return x.reshape((len(x), *shape))

    def train_loader():
        # a fresh seeded loader per use: each model sees the same batches whatever was trained (or
        # loaded from the cache) before it, so a resumed run rebuilds identical models
        return make_loader(shaped(data.x_train), data.y_train, batch_size=cfg.batch_size, shuffle=True,
                           seed=cfg.seed)

    models_dir = out / "models"
    onnx_dir = out / "onnx"
    entries: list[NetEntry] = []

    def finish(entry: NetEntry, model) -> NetEntry:
        entry.model = model
        entry.network = to_network(model, shape)
        entry.neurons = _hidden_neurons(entry.network)
        if cfg.export_onnx:
            onnx_dir.mkdir(parents=True, exist_ok=True)
            path = onnx_dir / f"{entry.file_stem}.onnx"
            stamp = onnx_dir / f"{entry.file_stem}.fingerprint"
            if not (path.exists() and stamp.exists() and stamp.read_text() == entry.fingerprint):
                export_onnx(model, path, shape)
                stamp.write_text(entry.fingerprint)
            entry.onnx = str(path.relative_to(out))
        entries.append(entry)
        return entry

    train_keys = {k: getattr(cfg, k) for k in ("seed", "dataset", "test_size", "epochs", "lr", "batch_size")}
    for hidden in cfg.architectures:
        arch = arch_label(hidden)
        shape = DIGITS_IMAGE_SHAPE if is_conv_arch(hidden) else DIGITS_FLAT_SHAPE
        test = (shaped(data.x_test), data.y_test)
        calib = make_loader(shaped(data.x_train[calib_idx]), batch_size=256)
        fp = _hash({"kind": "dense", "hidden": hidden, **train_keys})
        stem = f"{arch}_dense"
        dense, meta = _load_cached(models_dir / f"{stem}.pt", models_dir / f"{stem}.json", fp)
        if dense is None:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                dense = conv_mlp(hidden, DIGITS_IMAGE_SHAPE) if is_conv_arch(hidden) else \
                    mlp((DIGITS_FLAT_SHAPE[0], *hidden, 10))
            train_classifier(dense, train_loader(), epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)
            meta = {"fingerprint": fp, "accuracy": evaluate(dense, test), "train_time": time.perf_counter() - t0}
            _save_cached(dense, models_dir / f"{stem}.pt", models_dir / f"{stem}.json", meta)
            log(f"trained {arch}: test accuracy {100 * meta['accuracy']:.2f}% ({meta['train_time']:.1f} s)")
        dense.eval()
        d_entry = finish(NetEntry(f"{arch}/dense", arch, hidden, "dense", 0.0, fp, meta["accuracy"],
                                  _nonzero_params(dense), 0), dense)

        for method in cfg.methods:
            for s in cfg.sparsities:
                pfp = _hash({"dense": fp, "method": method, "sparsity": s, "finetune": cfg.finetune_epochs,
                             "calibration": cfg.calibration, "selection_time_limit": cfg.selection_time_limit})
                net_id = f"{arch}/{method}/s{round(100 * s)}"
                stem = net_id.replace("/", "_")
                pruned, pmeta = _load_cached(models_dir / f"{stem}.pt", models_dir / f"{stem}.json", pfp)
                if pruned is None:
                    t0 = time.perf_counter()
                    if method == UNSTRUCTURED:
                        pruned = _unstructured_prune(dense, s)
                    else:
                        from mipprune.selector import ChannelSelector

                        sel = ChannelSelector(method, sparsity=s, seed=cfg.seed, time_limit=cfg.selection_time_limit)
                        pruned = sel.fit(dense, calib).prune(dense)
                    if cfg.finetune_epochs:
                        pruned = _finetune_keeping_zeros(pruned, dense, train_loader(), cfg)
                    pruned = pruned.eval()
                    pmeta = {"fingerprint": pfp, "accuracy": evaluate(pruned, test),
                             "prune_time": time.perf_counter() - t0}
                    _save_cached(pruned, models_dir / f"{stem}.pt", models_dir / f"{stem}.json", pmeta)
                pruned.eval()
                finish(NetEntry(net_id, arch, hidden, method, s, pfp, pmeta["accuracy"], _nonzero_params(pruned),
                                0, prune_time=pmeta.get("prune_time", 0.0)), pruned)
        log(f"pruned {arch}: {len(cfg.methods) * len(cfg.sparsities)} networks "
            f"(dense {100 * d_entry.accuracy:.2f}%)")
    return entries, data


def select_images(cfg: ExperimentConfig, entries: list[NetEntry], data) -> list[int]:
    """Indices of the first ``n_images`` test images that every dense net classifies correctly
    (so each query asks about a genuine prediction)."""
    x = data.x_test.reshape(len(data.x_test), -1).double().numpy()
    y = data.y_test.numpy()
    ok = np.ones(len(y), dtype=bool)
    for e in entries:
        if e.method == "dense":
            ok &= e.network.forward(x).argmax(axis=1) == y
    idx = np.flatnonzero(ok)[: cfg.n_images]
    if len(idx) < cfg.n_images:
        raise InvalidInputError(f"n_images must be <= {len(idx)} (test images all dense nets classify "
                                f"correctly); got {cfg.n_images}")
    return [int(i) for i in idx]


def make_spec(data, image: int, norm: str, eps: float):
    """The robustness query of test image ``image``: the flat image's ``norm`` ball of radius ``eps``
    ∩ [0, 1]; unsafe iff some other class's logit >= the true label's (one disjunct per class)."""
    from solvers.spec import Spec

    x = data.x_test[image].reshape(-1).double().numpy()
    label = int(data.y_test[image])
    return Spec.robustness(x, float(eps), label, 10, norm=norm, name=f"img{image}_{norm}_eps{eps:.6g}")


def attack_radius(network, center: np.ndarray, label: int, norm: str, *, seed: int = 0, iters: int = 10,
                  time_limit: float = 0.5) -> float:
    """Smallest radius (bisection: ``iters`` halvings of ``[0, cap]``) at which a short
    :func:`solvers.verify` run (``time_limit`` seconds: CROWN minimizers, PGD, LP points, and whatever
    MILP fits) falsifies the robustness query of ``network`` around ``center``.

    ``cap`` = 1 for L∞ (the whole [0, 1] box) and ``n_inputs`` for L1; returns ``cap`` when even that
    is not falsified. An upper estimate of the minimal adversarial radius: below it, the cheap
    stages of ``verify`` do not settle the query by a counterexample.
    """
    from solvers.spec import Spec
    from solvers.verify import verify

    cap = 1.0 if norm == "linf" else float(center.size)

    def falsified(r: float) -> bool:
        spec = Spec.robustness(center, r, label, network.n_outputs, norm=norm)
        return verify(network, spec, time_limit=time_limit, seed=seed).verdict.value == "falsified"

    if not falsified(cap):
        return cap
    lo, hi = 0.0, cap
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if falsified(mid) else (mid, hi)
    return hi


def _write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file beside it, fsync'ed, then
    ``os.replace`` (a crash leaves the old file or the new one, never a torn one)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _calibrate(job: tuple) -> float:
    """Pool worker: ``attack_radius`` of one ``(network, center, label, norm, seed, time_limit)``."""
    network, center, label, norm, seed, time_limit = job
    return attack_radius(network, center, label, norm, seed=seed, time_limit=time_limit)


def plan_queries(cfg: ExperimentConfig, entries: list[NetEntry], data, images: list[int], out: Path, *,
                 executor=None, console=None, progress: bool = False) -> list[dict]:
    """One query per (architecture, image, norm): ``{"arch", "image", "norm", "label", "eps", "attack_radius"}``.

    With ``cfg.radius == "calibrated"``, ``eps = radius_fraction × attack_radius`` of the *dense* net of
    that architecture (:func:`attack_radius`: so its queries sit just inside the radius that quick
    attacks settle — the hard ones, which need the MILP). The calibrations run on the configured
    executor; radii are cached in ``out/radii.json`` keyed by the dense net's fingerprint, the cache
    rewritten (atomically) after each calibration, so an interrupted run keeps those already done
    and a restart computes only the missing ones.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mipprune.executors import make_executor

    cache_path = out / "radii.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except json.JSONDecodeError:
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    plan = []   # (query, cache key or None, calibration job)
    for e in entries:
        if e.method != "dense":
            continue
        for image in images:
            x = data.x_test[image].reshape(-1).double().numpy()
            label = int(data.y_test[image])
            for norm in cfg.norms:
                q = {"arch": e.arch, "image": image, "norm": norm, "label": label, "eps": cfg.fixed_eps(norm),
                     "attack_radius": None}
                ck = f"{e.fingerprint}|{image}|{norm}|{cfg.seed}|{cfg.calibration_time:g}"
                plan.append((q, ck, (e.network, x, label, norm, cfg.seed, cfg.calibration_time)))
    if cfg.radius == "calibrated":
        todo = [(ck, job) for _, ck, job in plan if ck not in cache]
        if todo:
            ex = executor or make_executor(cfg.executor, cfg.jobs)
            jobs = {id(job): ck for ck, job in todo}
            try:
                with Progress(TextColumn("radii"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console, disable=not progress) as bar:
                    task = bar.add_task("radii", total=len(todo))
                    for job, r in ex.imap_unordered(_calibrate, [job for _, job in todo]):
                        cache[jobs[id(job)]] = float(r)
                        _write_json_atomic(cache_path, cache)   # each one kept at once (resume)
                        bar.update(task, advance=1)
            finally:
                if executor is None:
                    ex.close()
        for q, ck, _ in plan:
            q["attack_radius"] = cache[ck]
            q["eps"] = float(f"{cfg.radius_fraction * cache[ck]:.6g}")
    return [q for q, _, _ in plan]


def export_suite(cfg: ExperimentConfig, entries: list[NetEntry], data, queries: list[dict],
                 out: Path) -> Path | None:
    """The run's queries as a VNN-COMP suite: ``vnnlib/*.vnnlib`` (one per architecture, image and
    norm, shared by that architecture's networks) and ``instances.csv`` (rows ``onnx,vnnlib,timeout``,
    paths relative to ``out``).

    L1 balls have no VNN-LIB form, so only the L∞ queries are exported. Returns the CSV path, or
    ``None`` when there is nothing to export (no ONNX files, or only L1 queries).
    """
    from solvers.vnnlib import write_vnnlib

    linf = [q for q in queries if q["norm"] == "linf"]
    if not cfg.export_onnx or not linf:
        return None
    vdir = out / "vnnlib"
    vdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in linf:
        path = vdir / f"{q['arch']}_img{q['image']}_linf_eps{q['eps']:.6g}.vnnlib"
        write_vnnlib(make_spec(data, q["image"], "linf", q["eps"]), path)
        lines += [f"{e.onnx},{path.relative_to(out)},{cfg.time_limit:g}" for e in entries if e.arch == q["arch"]]
    csv_path = out / "instances.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


# ============================================================================ queries
def query_key(net_id: str, image: int, norm: str) -> str:
    return f"{net_id}|img{image}|{norm}"


def build_jobs(cfg: ExperimentConfig, entries: list[NetEntry], data, queries: list[dict]):
    """Every (network, query) pair as a :class:`~mipprune.executors.QueryJob`; dense nets first (the long
    ones), so that a pool finishes with short jobs. The job's fingerprint covers the network, the
    radius, the time limit, the backend and the verify options (a change recomputes the query)."""
    from mipprune.executors import QueryJob

    jobs = []
    for e in sorted(entries, key=lambda e: (e.method != "dense", -e.neurons)):
        for q in queries:
            if q["arch"] != e.arch:
                continue
            key = query_key(e.net_id, q["image"], q["norm"])
            fp = _hash({"net": e.fingerprint, "eps": q["eps"], "time_limit": cfg.time_limit,
                        "backend": cfg.backend, "options": cfg.verify_options})
            meta = {"net_id": e.net_id, "arch": e.arch, "method": e.method, "sparsity": e.sparsity,
                    "image": q["image"], "norm": q["norm"], "eps": q["eps"], "attack_radius": q["attack_radius"],
                    "fingerprint": fp}
            jobs.append(QueryJob(key, e.network, make_spec(data, q["image"], q["norm"], q["eps"]),
                                 float(cfg.time_limit), cfg.backend, dict(cfg.verify_options), meta))
    return jobs


def run_queries(cfg: ExperimentConfig, jobs, store: ResultStore, *, executor=None, progress: bool = True,
                console=None) -> tuple[int, int]:
    """Run the jobs not already in ``store`` on the configured executor, appending each row as it
    arrives. Returns ``(n_run, n_skipped)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mipprune import executors

    todo = [j for j in jobs if not store.done(j.key, j.meta["fingerprint"])]
    skipped = len(jobs) - len(todo)
    if not todo:
        return 0, skipped
    ex = executor or executors.make_executor(cfg.executor, cfg.jobs)
    counts: dict[str, int] = {}
    try:
        with Progress(TextColumn("queries"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, disable=not progress) as bar:
            task = bar.add_task("queries", total=len(todo), info="")
            for _job, row in ex.imap_unordered(executors.solve_query, todo):
                store.append(row)
                counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
                bar.update(task, advance=1, info=" ".join(f"{k}:{v}" for k, v in sorted(counts.items())))
    finally:
        if executor is None:
            ex.close()
    return len(todo), skipped


# ============================================================================ analysis
def _charged(row: dict) -> float:
    """Seconds charged to a query: its time if solved, else exactly the time limit (timeouts counted at
    the limit, even where the solver overshot it: conservative for speed-ups over dense)."""
    return float(row["time"]) if row["verdict"] in SOLVED else float(row["time_limit"])


def pair_queries(rows: list[dict]) -> list[dict]:
    """For every pruned-net query, the dense query of the same (arch, image, norm, eps) and the
    speed-up ``dense / pruned`` (times charged as in :func:`_charged`). ``bound`` tells how to read
    it: ``"exact"`` (both solved), ``"lower"`` (dense unsolved: the true speed-up is at least this),
    ``"upper"`` (pruned unsolved), ``"none"`` (neither solved: both charged the limit)."""
    dense = {(r["arch"], r["image"], r["norm"], r["eps"]): r for r in rows if r["method"] == "dense"}
    pairs = []
    for r in rows:
        if r["method"] == "dense":
            continue
        d = dense.get((r["arch"], r["image"], r["norm"], r["eps"]))
        if d is None:
            continue
        ds, ps = d["verdict"] in SOLVED, r["verdict"] in SOLVED
        bound = "exact" if ds and ps else "lower" if ps else "upper" if ds else "none"
        pairs.append({"net_id": r["net_id"], "arch": r["arch"], "method": r["method"], "sparsity": r["sparsity"],
                      "image": r["image"], "norm": r["norm"], "eps": r["eps"],
                      "dense_verdict": d["verdict"], "pruned_verdict": r["verdict"],
                      "dense_time": _charged(d), "pruned_time": _charged(r),
                      "speedup": _charged(d) / max(_charged(r), 1e-9), "bound": bound})
    return pairs


def surrogate_search(cfg: ExperimentConfig, rows: list[dict], entries: list[NetEntry], data) -> list[dict]:
    """Pham et al.: re-check every pruned net's counterexample on its dense net (float64 forward).

    One row per dense query: ``candidates`` (pruned counterexamples proposed), ``valid`` (those that
    are counterexamples of the *dense* net too), and, for dense queries its own MILP left unsolved,
    ``settled`` (a valid one exists, or PGD on the dense net started from the candidates found one),
    ``settled_by`` (net id or ``"pgd"``) and ``time_to_cex`` (the pruned query's seconds, plus PGD's).
    Every ``settled`` row has its counterexample re-checked with ``Spec.is_counterexample``.
    """
    from solvers.attack import pgd_attack

    nets = {e.net_id: e for e in entries}
    by_query: dict[tuple, list[dict]] = {}
    for r in rows:
        by_query.setdefault((r["arch"], r["image"], r["norm"], r["eps"]), []).append(r)
    out = []
    for (arch, image, norm, eps), group in sorted(by_query.items(), key=lambda kv: str(kv[0])):
        dense_rows = [r for r in group if r["method"] == "dense"]
        if not dense_rows:
            continue
        d = dense_rows[0]
        dense_net = nets[d["net_id"]].network
        spec = make_spec(data, image, norm, eps)
        cands = sorted((r for r in group if r["method"] != "dense" and r["counterexample"] is not None),
                       key=lambda r: r["time"])
        valid = [r for r in cands if spec.is_counterexample(dense_net, np.asarray(r["counterexample"]))]
        row = {"arch": arch, "image": image, "norm": norm, "eps": eps, "dense_net": d["net_id"],
               "dense_verdict": d["verdict"], "dense_time": _charged(d), "candidates": len(cands),
               "valid": len(valid), "valid_nets": [r["net_id"] for r in valid], "settled": False,
               "settled_by": None, "time_to_cex": None, "counterexample": None}
        if d["verdict"] not in SOLVED:
            if valid:
                row.update(settled=True, settled_by=valid[0]["net_id"], time_to_cex=float(valid[0]["time"]),
                           counterexample=valid[0]["counterexample"])
            elif cands and cfg.surrogate_pgd:
                t0 = time.perf_counter()
                x = pgd_attack(dense_net, spec, starts=np.array([r["counterexample"] for r in cands]),
                               time_limit=cfg.pgd_time_limit, seed=cfg.seed)
                if x is not None and spec.is_counterexample(dense_net, x):
                    row.update(settled=True, settled_by="pgd",
                               time_to_cex=float(cands[0]["time"]) + time.perf_counter() - t0,
                               counterexample=[float(v) for v in x])
        out.append(row)
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def aggregate(cfg: ExperimentConfig, entries: list[NetEntry], rows: list[dict], pairs: list[dict],
              surrogate: list[dict]) -> list[dict]:
    """One row per network: accuracy, size, MILP size, times, verdict counts, speed-up over dense."""
    dense_acc = {e.arch: e.accuracy for e in entries if e.method == "dense"}
    agg = []
    for e in entries:
        rs = [r for r in rows if r["net_id"] == e.net_id]
        milp_rs = [r for r in rs if r["milp_vars"] > 0]
        ps = [p for p in pairs if p["net_id"] == e.net_id]
        verdicts = {v: sum(r["verdict"] == v for r in rs) for v in ("verified", "falsified", "unknown", "timeout")}
        bounds = {p["bound"] for p in ps}
        a = {**e.summary(),
             "accuracy_drop": 100 * (dense_acc[e.arch] - e.accuracy),   # points
             "queries": len(rs), **verdicts,
             "unstable_median": _median([r["unstable"] for r in rs]),
             "milp_binaries_max": max((r["milp_binaries"] for r in rs), default=0),
             # the MILPs actually posed: queries that reached the MILP stage (a model was built)
             "milp_queries": len(milp_rs),
             "milp_binaries_median": _median([r["milp_binaries"] for r in milp_rs]),
             "milp_vars_max": max((r["milp_vars"] for r in rs), default=0),
             "bounds_time_median": _median([r["bounds_time"] for r in rs]),
             "milp_time_median": _median([r["stage_times"].get("milp", 0.0) for r in rs]),
             "time_median": _median([_charged(r) for r in rs]),
             "time_total": float(sum(_charged(r) for r in rs))}
        if e.method != "dense":
            sp = [p["speedup"] for p in ps]
            ver = [p for p in ps if p["pruned_verdict"] == "verified"]
            a.update(speedup_median=_median(sp), speedup_geomean=float(np.exp(np.mean(np.log(sp)))) if sp else None,
                     speedup_is_lower_bound=bool("lower" in bounds and "upper" not in bounds),
                     # like for like: only the queries this net *proved* robust (no early exit at a
                     # counterexample of a less robust net)
                     speedup_median_verified=_median([p["speedup"] for p in ver]), n_pruned_verified=len(ver),
                     verified_is_lower_bound=bool(any(p["bound"] == "lower" for p in ver)),
                     same_verdict=sum(p["dense_verdict"] == p["pruned_verdict"] and p["bound"] == "exact" for p in ps),
                     dense_timeouts=sum(p["bound"] in ("lower", "none") for p in ps),
                     solved_where_dense_unsolved=sum(p["bound"] == "lower" for p in ps),
                     surrogate_candidates=sum(r["counterexample"] is not None for r in rs),
                     surrogate_valid=sum(e.net_id in s["valid_nets"] for s in surrogate),
                     surrogate_settled=sum(s["settled_by"] == e.net_id for s in surrogate))
        agg.append(a)
    return agg


def headline(cfg: ExperimentConfig, agg: list[dict], surrogate: list[dict]) -> dict | None:
    """The headline of a run: on the largest architecture, among pruned nets losing at most
    ``cfg.max_accuracy_drop`` points of test accuracy, the one with the largest median speed-up
    (``best``) and the best sparsity of each method (``per_method``); ``None`` without a dense net."""
    dense = [a for a in agg if a["method"] == "dense"]
    if not dense:
        return None
    largest = max(dense, key=lambda a: (a["neurons"], a["params"]))
    sur = [s for s in surrogate if s["arch"] == largest["arch"]]
    cands = [a for a in agg if a["arch"] == largest["arch"] and a["method"] != "dense"
             and a["accuracy_drop"] <= cfg.max_accuracy_drop + 1e-9 and a.get("speedup_median") is not None]
    rank = lambda a: (a["speedup_median"], -a["accuracy_drop"])  # noqa: E731
    per_method = {}
    for a in cands:
        if a["method"] not in per_method or rank(a) > rank(per_method[a["method"]]):
            per_method[a["method"]] = a
    return {"arch": largest["arch"], "dense": largest, "best": max(cands, key=rank) if cands else None,
            "per_method": per_method, "dense_unsolved": sum(s["dense_verdict"] not in SOLVED for s in sur),
            "surrogate_settled": sum(s["settled"] for s in sur)}


# ============================================================================ the run
class _torch_threads:
    """Context: ``torch.set_num_threads(n)`` inside, the previous setting restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


@dataclass
class ExperimentResult:
    """Everything a run produced (``rows``: per query; ``aggregated``: per network)."""

    config: ExperimentConfig
    out: Path
    entries: list
    images: list
    queries: list
    rows: list
    pairs: list
    surrogate: list
    aggregated: list
    headline: dict | None
    n_run: int
    n_skipped: int
    wall_time: float
    files: dict = field(default_factory=dict)


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike = "runs/experiment", *, progress: bool = True,
                   console=None, report: bool = True) -> ExperimentResult:
    """Run (or resume) the experiment of ``cfg`` in folder ``out`` and write its reports there.

    Files: ``queries.jsonl`` (one row per finished query, appended as it finishes: the resume log),
    ``models/`` (cached torch models), ``onnx/`` + ``vnnlib/`` + ``instances.csv`` (VNN-COMP layout),
    ``results.csv``, ``results.json``, ``report.md`` and PNG figures.
    """
    from rich.console import Console

    t0 = time.perf_counter()
    console = console or Console(quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    with _torch_threads(1):   # tiny MLPs: threads only add sync stalls (and the pool owns the cores)
        entries, data = prepare_networks(cfg, out, log=lambda m: console.print(f"[dim]{m}[/]"))
    images = select_images(cfg, entries, data)
    from mipprune.executors import make_executor

    executor = make_executor(cfg.executor, cfg.jobs)   # one pool / Ray session for both phases
    try:
        queries = plan_queries(cfg, entries, data, images, out, executor=executor, console=console,
                               progress=progress)
        suite = export_suite(cfg, entries, data, queries, out)
        jobs = build_jobs(cfg, entries, data, queries)
        store = ResultStore(out / "queries.jsonl")
        n_run, n_skipped = run_queries(cfg, jobs, store, executor=executor, progress=progress, console=console)
    finally:
        executor.close()
    rows = [store.rows[j.key] for j in jobs]
    pairs = pair_queries(rows)
    surrogate = surrogate_search(cfg, rows, entries, data) if cfg.surrogate else []
    agg = aggregate(cfg, entries, rows, pairs, surrogate)
    res = ExperimentResult(cfg, out, entries, images, queries, rows, pairs, surrogate, agg,
                           headline(cfg, agg, surrogate), n_run, n_skipped, 0.0)
    res.wall_time = time.perf_counter() - t0
    if report:
        from mipprune import experiment_report

        res.files = experiment_report.write_all(res, data)
    if suite is not None:
        res.files["instances"] = suite
    return res


__all__ = ["ExperimentConfig", "ExperimentResult", "ResultStore", "NetEntry", "load_config", "validate_config",
           "run_experiment", "prepare_networks", "select_images", "make_spec", "attack_radius", "plan_queries",
           "build_jobs", "run_queries",
           "pair_queries", "surrogate_search", "aggregate", "headline", "query_key", "arch_label",
           "export_onnx", "export_suite", "default_config_path", "known_methods", "UNSTRUCTURED"]
