"""ShuffleNet V1 and V2 for CIFAR as CRD (Tian et al., ICLR 2020) and mdistiller define them
(their ``ShuffleV1``: groups 3, 240/480/960 channels; ``ShuffleV2``: width 1, 116/232/464 channels).

Both start with a 1x1 convolution of 24 channels at full resolution (no stride, no max-pool, for 32 px
inputs), then three stages that each halve the resolution, global average pooling and a linear
classifier. Module names match theirs (``layer1.0.conv1``, ``linear``), so their published checkpoints
(``{"model": state_dict}``) load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar_stages import StagedNet, stage_info


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (N, g, C/g, H, W) -> (N, C/g, g, H, W) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1. A stride-2 unit concatenates a 3x3
    average-pooled shortcut (so its branch makes ``channels`` minus the input's); the first unit of the
    network (24 input channels) uses an ungrouped first convolution."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = channels // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return F.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class CifarShuffleNetV1(StagedNet):
    """Stages (``feature_info``): the stem, then layer1 to layer3."""

    def __init__(
        self,
        widths: tuple[int, int, int] | list[int] = (240, 480, 960),
        blocks: tuple[int, int, int] | list[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            units = []
            for unit in range(count):
                # The first unit's branch leaves room for the concatenated shortcut.
                branch, stride = (width - channels, 2) if unit == 0 else (width, 1)
                units.append(ShuffleV1Unit(channels, branch, stride, groups))
                channels = width
            setattr(self, f"layer{index + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(channels, num_classes)
        self.feature_info = [stage_info(24, 1, "bn1")] + [
            stage_info(width, 2 ** (index + 1), f"layer{index + 1}") for index, width in enumerate(widths)
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self) -> list:
        return [self.stem, self.layer1, self.layer2, self.layer3]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))  # the reference's avg_pool2d(4) at 32 px


class ShuffleV2Unit(nn.Module):
    """Half the channels pass through; the other half go 1x1, depthwise 3x3, 1x1; then a shuffle of 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :]
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))
        return channel_shuffle(torch.cat([kept, F.relu(self.bn3(self.conv3(branch)))], 1), 2)


class ShuffleV2Down(nn.Module):
    """The stride-2 unit: both branches see the whole input and halve its resolution."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(StagedNet):
    """``widths``: the three stages and the last 1x1 convolution (width 1: 116, 232, 464, 1024).
    Stages (``feature_info``): the stem, then layer1 to layer3."""

    def __init__(
        self,
        widths: tuple[int, int, int, int] | list[int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] | list[int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for index, (width, count) in enumerate(zip(widths[:3], blocks, strict=True)):
            layer = nn.Sequential(ShuffleV2Down(channels, width), *(ShuffleV2Unit(width) for _ in range(count)))
            setattr(self, f"layer{index + 1}", layer)
            channels = width
        self.conv2 = nn.Conv2d(channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_info = [stage_info(24, 1, "bn1")] + [
            stage_info(width, 2 ** (index + 1), f"layer{index + 1}") for index, width in enumerate(widths[:3])
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self) -> list:
        return [self.stem, self.layer1, self.layer2, self.layer3]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))  # the reference's avg_pool2d(4) at 32 px
