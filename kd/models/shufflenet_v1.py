"""ShuffleNet V1 at ImageNet scale (Zhang, Zhou, Lin and Sun, "ShuffleNet: An Extremely Efficient Convolutional
Neural Network for Mobile Devices", CVPR 2018), Table 1.

A 3x3 stride-2 convolution of 24 channels and a 3x3 max-pool, then three stages (4, 8 and 4 units, the first of
each with stride 2), global average pooling and a linear classifier. A unit is a grouped 1x1 convolution to a
quarter of the stage's width, a channel shuffle, a 3x3 depthwise convolution, a grouped 1x1 convolution back,
added to the input; a stride-2 unit concatenates a 3x3 average-pooled shortcut instead, so its branch makes the
stage's width minus the input's. The first unit of the network has an ungrouped first 1x1 convolution (its input
has only 24 channels). ``groups`` (g = 1, 2, 3, 4, 8) picks the widths of Table 1, which keep the complexity near
140 MFLOPs at 1x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.models.cifar_shufflenet import channel_shuffle
from kd.models.cifar_stages import StagedNet, stage_info

# Table 1: output channels of Stage2 to Stage4 at 1x for each group count.
WIDTHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}
STEM = 24


class ShuffleUnit(nn.Module):
    """GConv 1x1, shuffle, DWConv 3x3, GConv 1x1 (Figure 2 (b) and (c)); BatchNorm after each, ReLU after the
    first and after the addition or concatenation."""

    def __init__(self, in_channels: int, width: int, groups: int, stride: int, first_groups: int) -> None:
        super().__init__()
        mid, self.stride, self.groups = width // 4, stride, groups
        out = width - in_channels if stride == 2 else width
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(StagedNet):
    """``groups``: g of Table 1; ``scale``: the width multiplier s (1.0 is "ShuffleNet 1x").
    Stages (``feature_info``): the stem (after its ReLU), then Stage2 to Stage4."""

    def __init__(
        self,
        groups: int = 3,
        scale: float = 1.0,
        blocks: tuple[int, ...] | list[int] = (4, 8, 4),
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if groups not in WIDTHS:
            raise KdError(f"ShuffleNet V1 has groups={groups}, not one of Table 1's; use groups 1, 2, 3, 4 or 8")
        widths = [int(width * scale) for width in WIDTHS[groups]]
        self.conv1 = nn.Conv2d(in_chans, STEM, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = STEM
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            units = []
            for unit in range(count):
                first_groups = 1 if index == 0 and unit == 0 else groups
                units.append(ShuffleUnit(channels, width, groups, 2 if unit == 0 else 1, first_groups))
                channels = width
            setattr(self, f"stage{index + 2}", nn.Sequential(*units))
        self.fc = nn.Linear(channels, num_classes)
        self.feature_info = [stage_info(STEM, 2, "bn1")] + [
            stage_info(width, 2 ** (index + 3), f"stage{index + 2}") for index, width in enumerate(widths)
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.maxpool(x))

    def stage_forwards(self) -> list:
        return [self.stem, self.first_stage, self.stage3, self.stage4]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
