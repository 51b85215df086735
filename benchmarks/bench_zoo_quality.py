"""Quality of channel-group pruning on CIFAR-sized torchvision models trained on the digits.

Issue 12 (b): ResNet-18/50, MobileNetV2, DenseNet-121, VGG-11-BN trained for a few epochs on the
8×8 digits upsampled to 3×32×32, then half of every group's units removed by
(1) mipprune (``ChannelSelector``, sequential calibration on the training split, least-squares
reconstruction), (2) the same masks without reconstruction, (3) Torch-Pruning's magnitude pruner
(no reconstruction). No fine-tuning anywhere: the table isolates the selection + reconstruction.
Needs torchvision and torch-pruning aside (see bench_zoo.py). Writes benchmarks/out/bench_zoo_quality.json.

    PYTHONPATH=/tmp/tvpkgs:. .venv/bin/python benchmarks/bench_zoo_quality.py --models resnet18,mobilenet_v2
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def digits32(seed: int = 0):
    from mipprune.data import load_digits_data

    d = load_digits_data(seed=seed)

    def up(x):
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    return up(d.x_train), d.y_train, up(d.x_test), d.y_test


def main() -> None:
    from benchmarks.tv_shim import import_torchvision
    from mipprune.data import make_loader
    from mipprune.pruning.selector import ChannelSelector
    from mipprune.train import count_flops, evaluate, train_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,vgg11_bn,densenet121,resnet50")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--method", default="lasso")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = import_torchvision()
    import torch_pruning as tp

    xtr, ytr, xte, yte = digits32()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(tv.models, name)(num_classes=10)
        t0 = time.perf_counter()
        model = train_classifier(model, make_loader(xtr, ytr, batch_size=64, shuffle=True), epochs=args.epochs,
                                 lr=1e-3)
        train_time = time.perf_counter() - t0
        dense_acc = evaluate(model, (xte, yte))
        t0 = time.perf_counter()
        sel = ChannelSelector(args.method, sparsity=args.sparsity, positions=10).fit(model, make_loader(xtr, batch_size=128))
        fit_time = time.perf_counter() - t0
        ours, masked = sel.prune(model), sel.prune(model, reconstruct=False)
        tp_model = copy.deepcopy(model)
        t0 = time.perf_counter()
        last = [m for m in tp_model.modules() if isinstance(m, nn.Linear)][-1:]
        tp.pruner.MetaPruner(tp_model, xtr[:1], importance=tp.importance.MagnitudeImportance(p=1),
                             pruning_ratio=args.sparsity, ignored_layers=last).step()
        tp_time = time.perf_counter() - t0
        f0 = count_flops(model, (3, 32, 32))
        row = {"model": name, "train_s": train_time, "dense_acc": dense_acc,
               "mipprune_acc": evaluate(ours, (xte, yte)), "mask_only_acc": evaluate(masked, (xte, yte)),
               "tp_magnitude_acc": evaluate(tp_model, (xte, yte)), "mipprune_s": fit_time, "tp_s": tp_time,
               "mipprune_flops": count_flops(ours, (3, 32, 32)) / f0, "tp_flops": count_flops(tp_model, (3, 32, 32)) / f0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_zoo_quality.json").write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
        "method": args.method, "sparsity": args.sparsity, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
