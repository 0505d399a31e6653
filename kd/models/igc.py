"""IGC V1: interleaved group convolutional networks (Zhang, Qi, Xiao and Wang, "Interleaved Group Convolutions
for Deep Neural Networks", ICCV 2017), at ImageNet scale.

Each 3x3 convolution of a ResNet-18 basic block becomes an interleaved group convolution: a primary group
convolution (3x3, ``L`` partitions of ``M`` channels), a permutation that puts the m-th channel of every primary
partition into the m-th secondary partition, a secondary group convolution (1x1, ``M`` partitions of ``L``
channels), the inverse permutation, then BatchNorm (and ReLU after the first of the two). The projection
shortcut of a block that changes width is a 1x1 group convolution with the primary partitions.

The widths and partitions are those of the authors' released ImageNet symbols
(hellozting/InterleavedGroupConvolutions, ``models/IGC-*_ImageNet/*-symbol.json``): a 7x7 stem, a 3x3 max-pool,
four stages of two blocks whose width doubles from stage to stage, global average pooling and a linear
classifier. IGC-L4M32 and IGC-L16M16 double M and keep L (4 and 16); IGC-L100M2 doubles L and keeps M = 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar_shufflenet import channel_shuffle
from kd.models.cifar_stages import StagedNet, stage_info


class InterleavedGroupConv(nn.Module):
    """Primary group convolution (``kernel`` x ``kernel``, ``primary`` partitions), permutation, secondary
    group convolution (1x1, one partition per channel of a primary partition), permutation back."""

    def __init__(self, in_channels: int, channels: int, primary: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.primary, self.secondary = primary, channels // primary
        self.conv1 = nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, groups=primary, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 1, groups=self.secondary, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The m-th secondary partition gathers the m-th channel of each primary partition (the authors' Reorder
        # op with branch_factor=L), and the second permutation puts every channel back where it came from.
        x = channel_shuffle(self.conv1(x), self.primary)
        return channel_shuffle(self.conv2(x), self.secondary)


class IGCBlock(nn.Module):
    """A ResNet basic block whose two 3x3 convolutions are interleaved group convolutions."""

    def __init__(self, in_channels: int, channels: int, primary: int, stride: int) -> None:
        super().__init__()
        self.igc1 = InterleavedGroupConv(in_channels, channels, primary, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.igc2 = InterleavedGroupConv(channels, channels, primary)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if in_channels != channels or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, groups=primary, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.igc2(F.relu(self.bn1(self.igc1(x)))))
        return F.relu(out + self.shortcut(x))


class IGCNet(StagedNet):
    """``stem``: the 7x7 stem's width; ``widths`` and ``primary``: each stage's width and primary partitions
    (its secondary partitions are width / primary). Stages (``feature_info``): the stem, then the four stages."""

    def __init__(
        self,
        stem: int = 128,
        widths: tuple[int, ...] | list[int] = (128, 256, 512, 1024),
        primary: tuple[int, ...] | list[int] = (4, 4, 4, 4),
        blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = stem
        for index, (width, partitions, count) in enumerate(zip(widths, primary, blocks, strict=True)):
            units = []
            for unit in range(count):
                units.append(IGCBlock(channels, width, partitions, 2 if unit == 0 and index > 0 else 1))
                channels = width
            setattr(self, f"layer{index + 1}", nn.Sequential(*units))
        self.fc = nn.Linear(channels, num_classes)
        self.feature_info = [stage_info(stem, 2, "bn1")] + [
            stage_info(width, 2 ** (index + 2), f"layer{index + 1}") for index, width in enumerate(widths)
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(self.maxpool(x))

    def stage_forwards(self) -> list:
        return [self.stem, self.first_stage, self.layer2, self.layer3, self.layer4]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
