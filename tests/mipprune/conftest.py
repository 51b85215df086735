"""Tiny torch models for the bridge / graph / surgery tests (each forward takes well under a ms)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def conv_net() -> nn.Sequential:
    """conv→BN→ReLU→conv→ReLU→MaxPool→Flatten→Linear→ReLU→Linear on (N, 3, 8, 8) inputs."""
    torch.manual_seed(0)
    return randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),   # 0: 8x8
        nn.BatchNorm2d(6),               # 1
        nn.ReLU(),                       # 2
        nn.Conv2d(6, 5, 3),              # 3: 6x6
        nn.ReLU(),                       # 4
        nn.MaxPool2d(2),                 # 5: 3x3
        nn.Flatten(),                    # 6
        nn.Linear(5 * 9, 7),             # 7
        nn.ReLU(),                       # 8
        nn.Linear(7, 3),                 # 9
    ))


def mlp() -> nn.Sequential:
    """Linear→ReLU→Linear→BN1d→ReLU→Dropout→Linear on (N, 6) inputs."""
    torch.manual_seed(1)
    return randomize_batchnorms(nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(7, 2),
    ), seed=1)


class FunctionalNet(nn.Module):
    """Functional ops: ``F.relu``, ``torch.relu``, ``F.max_pool2d``, ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, 2)
        randomize_batchnorms(self, seed=2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class ResidualNet(nn.Module):
    """conv1 → relu → conv2, plus a skip (conv1 output added to conv2 output) → conv3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        return self.conv3(torch.relu(self.conv2(a) + a))


class BranchNet(nn.Module):
    """One conv feeding two convs whose outputs are concatenated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 3, 1)
        self.right = nn.Conv2d(4, 3, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        return self.head(torch.cat([self.left(s), self.right(s)], dim=1))


class ReversedNet(nn.Module):
    """Modules defined in the opposite order to the one the forward calls them in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.last = nn.Linear(4, 2)
        self.middle = nn.Linear(5, 4)
        self.first = nn.Linear(3, 5)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch single-threaded in every test here: tiny ops under a loaded machine are 100x faster
    without OpenMP's thread hand-offs (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def conv_model() -> nn.Sequential:
    return conv_net()


@pytest.fixture
def conv_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10))


@pytest.fixture
def mlp_model() -> nn.Sequential:
    return mlp()


@pytest.fixture
def mlp_input() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(11))


@pytest.fixture
def functional_model() -> FunctionalNet:
    return FunctionalNet()


@pytest.fixture
def functional_input() -> torch.Tensor:
    return torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(12))


def batches(shape: tuple[int, ...], n_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` random input batches of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n_batches)]


def run_cli(argv, capsys, raw: bool = False) -> tuple[int, str, str]:
    """Run ``mipprune`` in-process; return (exit code, stdout, stderr) with rich's wrapping undone
    (``raw``: as printed; stdout and stderr are captured, so not terminals, like a pipe or a log)."""
    from mipprune.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    if raw:
        return code, out, err
    return code, " ".join(out.split()), " ".join(err.split())
