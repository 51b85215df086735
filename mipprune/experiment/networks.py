"""The experiment's networks: train the dense nets, prune them with every method and sparsity,
export ONNX, cache models by fingerprint (:class:`NetEntry`)."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mipprune.experiment.config import ExperimentConfig, UNSTRUCTURED, is_conv_arch



# ============================================================================ networks
def arch_label(hidden: tuple) -> str:
    """``(100, 100, 100)`` → ``"3x100"``; mixed widths → ``"50-100"``; conv → ``"c8-c16s2-64"``."""
    if len(set(hidden)) == 1 and not is_conv_arch(hidden):
        return f"{len(hidden)}x{hidden[0]}"
    return "-".join(map(str, hidden))


def content_hash(obj) -> str:
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
    from mipprune.verification.export import to_network
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
        fp = content_hash({"kind": "dense", "hidden": hidden, **train_keys})
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
                pfp = content_hash({"dense": fp, "method": method, "sparsity": s, "finetune": cfg.finetune_epochs,
                             "calibration": cfg.calibration, "selection_time_limit": cfg.selection_time_limit})
                net_id = f"{arch}/{method}/s{round(100 * s)}"
                stem = net_id.replace("/", "_")
                pruned, pmeta = _load_cached(models_dir / f"{stem}.pt", models_dir / f"{stem}.json", pfp)
                if pruned is None:
                    t0 = time.perf_counter()
                    if method == UNSTRUCTURED:
                        pruned = _unstructured_prune(dense, s)
                    else:
                        from mipprune.pruning.selector import ChannelSelector

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


