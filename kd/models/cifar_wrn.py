"""The CIFAR Wide ResNets of the KD literature (wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko & Komodakis's WRN-d-k as CRD (Tian et al., ICLR 2020) and mdistiller define it for CIFAR-100:
a 3x3 stem of 16 channels, three stages of ``n = (depth - 4) / 6`` pre-activation basic blocks of
16k, 32k, 64k channels at strides 1, 2, 2, a final BatchNorm-ReLU, global average pooling and a linear
classifier. Module names match theirs (``block1.layer.0.convShortcut``), so their published checkpoints
(``{"model": state_dict}``) load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.models.cifar_stages import StagedNet, init_like_crd, stage_info


class WideBasic(nn.Module):
    """A pre-activation block. When the width or stride changes, the shortcut (a 1x1 convolution) starts
    from the activated input, as in CRD's definition; otherwise it is the raw input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.convShortcut = None  # the reference's name, which its checkpoints carry
        if in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    """``blocks`` blocks under ``layer`` (the reference's NetworkBlock, hence ``block1.layer.0``)."""

    def __init__(self, blocks: int, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasic(in_channels if i == 0 else channels, channels, stride if i == 0 else 1) for i in range(blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """WRN-``depth``-``widen_factor``; stages (``feature_info``): the stem, then block1 to block3 (their raw,
    pre-activation outputs, as mdistiller's ``feats``)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a CIFAR Wide ResNet has depth 6n + 4 (10, 16, 22, 28, 40, ...), not {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)  # CRD's avg_pool2d(8) on its 8x8 map; this also fits other sizes
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [
            stage_info(widths[0], 1, "conv1"),
            stage_info(widths[1], 1, "block1"),
            stage_info(widths[2], 2, "block2"),
            stage_info(widths[3], 4, "block3"),
        ]
        init_like_crd(self)

    def stage_forwards(self) -> list:
        return [self.conv1, self.block1, self.block2, self.block3]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.bn1(x))).flatten(1))
