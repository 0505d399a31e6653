"""MobileNetV2 for CIFAR as CRD (Tian et al., ICLR 2020) and mdistiller define it (their ``MobileNetV2``,
``mobile_half``: width 0.5, expansion 6).

Sandler et al.'s inverted residuals at CIFAR strides (a stride-2 stem, then strides 1, 1, 2, 2, 1, 2, 1
over the seven block groups, so a 32 px input ends at 2x2), a 1x1 convolution to 1280 channels, global
average pooling and a linear classifier. Unlike torchvision's, the first block (expansion 1) keeps its
1x1 expansion convolution, as in the reference. Module names match theirs (``blocks.0.0.conv.0``,
``classifier.0``), so their published checkpoints (``{"model": state_dict}``) load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar_stages import StagedNet, init_like_crd, stage_info

# (expansion, channels, blocks, stride) of each block group; expansion None: the network's ``expansion``.
SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2))
SETTING = (*SETTING, (None, 320, 1, 1))
# mdistiller's feats: the stem, then the outputs of block groups 1, 2, 4 and 6 (0-based).
STAGE_ENDS = (1, 2, 4, 6)


def conv_bn_relu(in_channels: int, channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection (under ``conv``); a residual when shapes allow."""

    def __init__(self, in_channels: int, channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(StagedNet):
    """``width_mult`` 0.5 and ``expansion`` 6 are the KD papers' student. Stages (``feature_info``): the stem,
    then the outputs of block groups 1, 2, 4 and 6, as mdistiller's ``feats``."""

    def __init__(self, width_mult: float = 0.5, expansion: int = 6, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_chans, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for ratio, width, count, stride in SETTING:
            out = int(width * width_mult)
            group = []
            for index in range(count):
                group.append(InvertedResidual(channels, out, stride if index == 0 else 1, ratio or expansion))
                channels = out
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(2, ceil_mode) on its 2x2 map at 32 px
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        reductions = {1: 2, 2: 4, 4: 8, 6: 16}
        self.feature_info = [stage_info(int(32 * width_mult), 2, "conv1")] + [
            stage_info(int(SETTING[end][1] * width_mult), reductions[end], f"blocks.{end}") for end in STAGE_ENDS
        ]
        init_like_crd(self, linear_std=0.01)

    def stage_forwards(self) -> list:
        def groups(first: int, last: int):
            def run(x: torch.Tensor) -> torch.Tensor:
                for index in range(first, last + 1):
                    x = self.blocks[index](x)
                return x

            return run

        starts = (0, *(end + 1 for end in STAGE_ENDS[:-1]))
        return [self.conv1, *(groups(first, last) for first, last in zip(starts, STAGE_ENDS, strict=True))]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))
