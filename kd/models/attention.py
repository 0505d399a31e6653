"""The Residual Attention Network (Wang, Jiang, Qian, Yang, Li, Zhang, Wang and Tang, "Residual Attention Network
for Image Classification", CVPR 2017): Attention-56 and Attention-92 for ImageNet (Table 2).

Built from pre-activation bottleneck residual units (BN-ReLU-conv 1x1, 3x3, 1x1, a quarter of the width inside;
a 1x1 projection of the pre-activated input where the width or resolution changes). Each attention module has
p = 1 unit before it splits, a trunk branch of t = 2 units, and a mask branch: a bottom-up path of max-pools with
r = 1 unit after each (the number of pools takes the feature map down to 7x7 at 224 px, so three pools in the first
stage, two in the second and one in the third), residual units on the skip connections between the two paths, a
top-down path that upsamples bilinearly and adds the skip connection, then BN-ReLU-conv 1x1 twice and a sigmoid.
Attention residual learning: the module's output is (1 + M(x)) * T(x), followed by p = 1 unit. The layout of the
mask branch follows the authors' released Attention-92 deploy prototxt (fwang91/residual-attention-network).

The network: a 7x7 stride-2 convolution of 64 channels, a 3x3 max-pool, then three stages, each a residual unit
(the last two with stride 2) and 1, 1, 1 (Attention-56) or 1, 2, 3 (Attention-92) attention modules at 256, 512 and
1024 channels, then three residual units at 2048 channels (the first with stride 2), BN-ReLU, global average
pooling and a linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar_stages import StagedNet, stage_info


class PreActBottleneck(nn.Module):
    """A pre-activation residual unit (He et al., ECCV 2016) with a bottleneck of a quarter of ``channels``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.shortcut = None
        if in_channels != channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def units(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(PreActBottleneck(channels, channels) for _ in range(count)))


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class AttentionModule(nn.Module):
    """Trunk and mask branches with ``pools`` max-pools in the mask branch (3, 2 or 1); output (1 + M) * T."""

    def __init__(self, channels: int, pools: int, p: int = 1, t: int = 2, r: int = 1) -> None:
        super().__init__()
        self.pools = pools
        self.pre = units(channels, p)
        self.trunk = units(channels, t)
        # Bottom-up: after each pool, r units (2r at the bottom, where the path turns around).
        self.down = nn.ModuleList(units(channels, 2 * r if i == pools - 1 else r) for i in range(pools))
        # A unit on each skip connection between the paths, and r units after each upsampling but the last.
        self.skips = nn.ModuleList(units(channels, 1) for _ in range(pools - 1))
        self.up = nn.ModuleList(units(channels, r) for _ in range(pools - 1))
        self.mask_head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.post = units(channels, p)

    def mask(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """M(x) in [0, 1], the trunk's shape: a bottom-up top-down pass with skip connections."""
        inputs, skips = [], []  # each level's input (the size to upsample back to) and its skip connection
        for level in range(self.pools):
            inputs.append(x)
            x = self.down[level](F.max_pool2d(x, 3, 2, 1))
            if level < self.pools - 1:
                skips.append(self.skips[level](x))
        for level in reversed(range(self.pools - 1)):
            # As the deploy prototxt: the upsampled map, plus the same level's bottom-up output and its skip unit.
            x = self.up[level](upsample_to(x, inputs[level + 1]) + inputs[level + 1] + skips[level])
        return self.mask_head(upsample_to(x, trunk) + trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        return self.post((1 + self.mask(x, trunk)) * trunk)


class ResidualAttentionNet(StagedNet):
    """``modules``: attention modules in each of the three attention stages (1, 1, 1: Attention-56; 1, 2, 3:
    Attention-92). Stages (``feature_info``): the stem (after its ReLU), then the four stages."""

    def __init__(
        self,
        modules: tuple[int, int, int] | list[int] = (1, 1, 1),
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for index, (width, count) in enumerate(zip((256, 512, 1024), modules, strict=True)):
            stage = [PreActBottleneck(channels, width, 1 if index == 0 else 2)]
            stage += [AttentionModule(width, pools=3 - index) for _ in range(count)]
            setattr(self, f"stage{index + 1}", nn.Sequential(*stage))
            channels = width
        self.stage4 = nn.Sequential(PreActBottleneck(channels, 2048, 2), units(2048, 2))
        self.bn2 = nn.BatchNorm2d(2048)
        self.fc = nn.Linear(2048, num_classes)
        self.feature_info = [stage_info(64, 2, "bn1")] + [
            stage_info(width, 2 ** (index + 2), f"stage{index + 1}")
            for index, width in enumerate((256, 512, 1024, 2048))
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage1(self.maxpool(x))

    def stage_forwards(self) -> list:
        return [self.stem, self.first_stage, self.stage2, self.stage3, self.stage4]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        # The last units are pre-activation, so the head normalizes and activates before pooling.
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn2(x)), 1).flatten(1))
