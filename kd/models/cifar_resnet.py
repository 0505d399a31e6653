"""The CIFAR ResNets of the KD literature (resnet8 ... resnet110, resnet8x4, resnet32x4).

Neither timm nor torchvision has them. They follow the definition CRD (Tian et al., ICLR 2020) and
mdistiller use for their CIFAR-100 benchmarks: a 3x3 stem, three stages of ``n = (depth - 2) / 6``
basic blocks at strides 1, 2, 2, global average pooling and a linear classifier. Module names match
theirs, so their published checkpoints (``{"model": state_dict}``) load as they are. Its stages
(``feature_info``: the stem, then layer1 to layer3) are mdistiller's ``feats``, see kd.models.cifar_stages.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar_stages import StagedNet, stage_info


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(StagedNet):
    """``widths`` = (stem, stage 1, stage 2, stage 3): (16, 16, 32, 64) for resnet20/32/56/110,
    (32, 64, 128, 256) for the 4x-wide resnet8x4 and resnet32x4."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int] | list[int], num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2 (8, 14, 20, 32, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)  # CRD's AvgPool2d(8) on its 8x8 map; this also fits other sizes
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [
            stage_info(widths[0], 1, "relu"),
            stage_info(widths[1], 1, "layer1"),
            stage_info(widths[2], 2, "layer2"),
            stage_info(widths[3], 4, "layer3"),
        ]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self) -> list:
        return [self.stem, self.layer1, self.layer2, self.layer3]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))
