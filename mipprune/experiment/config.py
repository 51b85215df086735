"""Experiment configuration: :class:`ExperimentConfig`, its TOML form and validation."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

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
    :data:`solvers.selection.select.METHODS` (structured) and ``"unstructured"``."""
    from solvers.selection.select import METHODS

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
    from mipprune.experiment.executors import EXECUTORS

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


