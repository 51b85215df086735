"""Hand-built minimal blocks of the architectures people prune (torchvision's patterns, tiny widths).

Each model takes ``(N, 3, 8, 8)`` inputs and runs in well under a millisecond.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.mipprune.conftest import randomize_batchnorms


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` module called twice, identity skip."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNetTiny(nn.Module):
    """stem → two BasicBlocks → pool → fc: the stem, both blocks' outputs and fc share a group."""

    def __init__(self, c: int = 6, n_classes: int = 3):
        super().__init__()
        torch.manual_seed(20)
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)
        randomize_batchnorms(self, seed=20)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck with a downsample (1x1 conv + BN) on the skip."""

    def __init__(self, c_in: int, width: int, c_out: int, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class BottleneckNet(nn.Module):
    """stem → Bottleneck (with downsample) → pool → fc. ``groups > 1``: a ResNeXt block."""

    def __init__(self, groups: int = 1):
        super().__init__()
        torch.manual_seed(21)
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.block = Bottleneck(5, 8, 7, groups=groups)
        self.fc = nn.Linear(7, 3)
        randomize_batchnorms(self, seed=21)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcitation(nn.Module):
    """torchvision's SE: pool → fc1 (1x1 conv) → ReLU → fc2 → Hardsigmoid, times the input."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand 1x1 → BN → Hardswish → depthwise 3x3 → BN → SE → project 1x1 →
    BN, plus the identity skip."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = SqueezeExcitation(hidden, 4)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class MobileNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(22)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.block = InvertedResidual(4, 12)
        self.head = nn.Conv2d(4, 10, 1)
        self.classifier = nn.Linear(10, 3)
        randomize_batchnorms(self, seed=22)

    def forward(self, x):
        x = F.relu(self.head(self.block(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


class DenseTiny(nn.Module):
    """DenseNet's pattern: each layer reads the concat of all earlier feature maps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(23)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(7)
        self.conv_b = nn.Conv2d(7, 3, 3, padding=1)
        self.bn_t = nn.BatchNorm2d(10)
        self.transition = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 16, 3)
        randomize_batchnorms(self, seed=23)

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.conv_a(F.relu(self.bn_a(x0)))
        c1 = torch.cat([x0, x1], 1)
        x2 = self.conv_b(F.relu(self.bn_b(c1)))
        c2 = torch.cat([x0, x1, x2], 1)
        t = F.avg_pool2d(self.transition(F.relu(self.bn_t(c2))), 2)
        return self.fc(torch.flatten(F.relu(t), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shufflenetv2.channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleTiny(nn.Module):
    """ShuffleNetV2's down-sampling unit (two branches, concat, shuffle) then a split unit (chunk)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(24)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
                                     nn.Conv2d(4, 3, 1), nn.ReLU())
        self.branch2 = nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
                                     nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.BatchNorm2d(5),
                                     nn.Conv2d(5, 3, 1), nn.ReLU())
        self.split_branch = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))
        self.fc = nn.Linear(6, 3)
        randomize_batchnorms(self, seed=24)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = channel_shuffle(torch.cat((self.branch1(x), self.branch2(x)), 1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.split_branch(x2)), 1), 2)
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    """1x1 → grouped 3x3 (4 groups of 2) → 1x1: conv groups are removed whole."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(25)
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 3, 1)
        randomize_batchnorms(self, seed=25)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.gconv(x)))
        return self.conv3(x)


class BottleneckWide(nn.Module):
    """A wider stem → Bottleneck → fc (32/48/64 channels): fine enough units for budget windows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(26)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = Bottleneck(32, 48, 64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


class MixedWide(nn.Module):
    """Residual + depthwise + grouped: stem → [expand 1x1 → depthwise 3x3 → grouped 3x3 (8 groups) →
    project 1x1] + skip → head 1x1 → fc, wide enough (24–48 channels) for budget windows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(27)
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(24, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=8), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Conv2d(24, 40, 1)
        self.fc = nn.Linear(40, 3)
        randomize_batchnorms(self, seed=27)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.project(self.grouped(self.dw(self.expand(x)))))
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


BLOCKS = {
    "basic": ResNetTiny, "bottleneck": BottleneckNet, "resnext": lambda: BottleneckNet(groups=2),
    "inverted": MobileNetTiny, "dense": DenseTiny, "shuffle": ShuffleTiny, "grouped": GroupedNet,
}
