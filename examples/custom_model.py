"""Your own model and DataLoader: choose how many channels to keep per layer with a ``k`` dict.

Run: ``python examples/custom_model.py`` (a few seconds on a CPU, no download).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from rich import print as rprint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mipprune import ChannelSelector
from mipprune.data import load_digits_data
from mipprune.train import count_params, evaluate, finetune, train_classifier


class SmallNet(nn.Module):
    """A user-defined CNN written with functional calls (traced by torch.fx to find the groups)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 3, padding=1)
        self.fc1 = nn.Linear(24 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def main() -> None:
    data = load_digits_data(seed=1)
    torch.manual_seed(1)
    train_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(1))
    model = train_classifier(SmallNet(), train_loader, epochs=5, lr=1e-2, seed=1)
    test = (data.x_test, data.y_test)

    # k names layers by the consumer whose input channels shrink (or by the producer):
    # conv1's outputs 24 -> 8, conv2's outputs 24 -> 12; fc1's 48 outputs stay.
    selector = ChannelSelector(method="lasso", k={"conv2": 8, "fc1": 12})
    selector.fit(model, train_loader)  # any iterable of batches; labels are ignored
    rprint(selector.report())
    pruned = selector.prune(model)
    print(pruned)

    # optional: a short knowledge-distillation fine-tuning from the dense model
    tuned = finetune(pruned, model, train_loader, epochs=1, lr=1e-3)

    print(f"dense accuracy: {evaluate(model, test):.4f}")
    print(f"pruned accuracy: {evaluate(pruned, test):.4f}")
    print(f"fine-tuned accuracy: {evaluate(tuned, test):.4f}")
    print(f"parameters: {count_params(model)} -> {count_params(pruned)}")


if __name__ == "__main__":
    main()
