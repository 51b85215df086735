"""Train a small MLP on the digits (8×8, embedded in scikit-learn), then verify its L∞ robustness.

Run: ``python examples/verify_torch.py`` (a few seconds on a laptop CPU, no download).

``mipprune.to_network`` turns the torch model into the float64 numpy IR; ``Spec.robustness`` builds
the query "no input within eps of the image (clipped to [0, 1]) makes another class score at least
as high as the true one"; ``mipprune.verify`` answers verified (a proof), falsified (with a
counterexample re-checked in float64) or timeout.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import solvers
from mipprune import to_network, verify


def train_mlp(seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)          # pixels in [0, 1]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(200):                                  # full-batch: a fraction of a second
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    print(f"test accuracy: {acc:.3f}")
    return model, x[test], y[test]


def main(n_images: int = 8, eps: float = 0.08, time_limit: float = 20.0) -> None:
    torch.set_num_threads(1)
    model, x_test, y_test = train_mlp()
    net = to_network(model, (64,))                        # float64 copy; the model is untouched
    reference = copy.deepcopy(model).double().eval()
    print(f"network: {net}")
    counts = {v: 0 for v in solvers.Verdict}
    for i in range(n_images):
        x, label = x_test[i].astype(np.float64), int(y_test[i])
        pred = int(np.argmax(net.forward(x)))
        spec = solvers.Spec.robustness(x, eps, pred, 10)  # robustness of the network's own prediction
        res = verify(net, spec, time_limit=time_limit)
        counts[res.verdict] += 1
        extra = ""
        if res.verdict is solvers.Verdict.FALSIFIED:
            # re-check with torch itself (a float64 copy of the model)
            with torch.no_grad():
                logits = reference(torch.from_numpy(res.counterexample)[None])[0].numpy()
            assert spec.contains_input(res.counterexample) and np.delete(logits, pred).max() >= logits[pred]
            adv = int(np.argmax(logits))
            extra = f" -> counterexample classified {adv}, max change {np.abs(res.counterexample - x).max():.3f}"
        print(f"image {i} (label {label}, predicted {pred}): {res.verdict.value} in {res.time:.2f} s "
              f"by {res.stage}{extra}")
    print("summary: " + ", ".join(f"{v.value} {n}" for v, n in counts.items()))


if __name__ == "__main__":
    main()
