"""The CIFAR VGGs of the KD literature (vgg8, vgg13), with BatchNorm.

CRD (Tian et al., ICLR 2020) and mdistiller's ``vgg8`` and ``vgg13`` are their ``vgg8_bn`` and
``vgg13_bn``: five blocks of 3x3 conv-BN-ReLU (convolutions with bias), 64, 128, 256, 512, 512
channels, a 2x2 max-pool after each of the first three blocks, global average pooling and one linear
classifier (no VGG fully connected layers). Module names match theirs (``block0.0``, ``classifier``),
so their published checkpoints (``{"model": state_dict}``) load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.cifar_stages import StagedNet, init_like_crd, stage_info

# Convolutions per block: CRD's configurations "S" (vgg8) and "B" (vgg13).
BLOCKS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


def vgg_block(in_channels: int, channels: int, convs: int) -> nn.Sequential:
    """conv-BN-ReLU ``convs`` times, without the last ReLU (the network applies it, as the reference does;
    the layer indices of the checkpoints depend on it)."""
    layers: list[nn.Module] = []
    for index in range(convs):
        layers += [
            nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers[:-1])


class CifarVGG(StagedNet):
    """``depth`` 8, 11, 13, 16 or 19; stages (``feature_info``): the activated output of block0 to block4.

    Like the reference, the fourth max-pool runs only on large inputs: at 32 px block3 leaves a 4x4 map
    and block4 runs on it unpooled; from 64 px on (block3's map 8 px or more) it is pooled first.
    """

    def __init__(self, depth: int, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"a CIFAR VGG has depth 8, 11, 13, 16 or 19, not {depth}")
        widths = (in_chans, *WIDTHS)
        for index, convs in enumerate(BLOCKS[depth]):
            setattr(self, f"block{index}", vgg_block(widths[index], widths[index + 1], convs))
        for index in range(4):
            setattr(self, f"pool{index}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(WIDTHS[-1], num_classes)
        self.feature_info = [
            stage_info(width, reduction, f"block{index}")
            for index, (width, reduction) in enumerate(zip(WIDTHS, (1, 2, 4, 8, 8), strict=True))
        ]
        init_like_crd(self, linear_std=0.01)

    def stage_forwards(self) -> list:
        def stage(index: int):
            block = getattr(self, f"block{index}")
            before = getattr(self, f"pool{index - 1}") if index else None

            def run(x: torch.Tensor) -> torch.Tensor:
                if before is not None and (index < 4 or x.shape[-2] >= 8):
                    x = before(x)
                return F.relu(block(x))

            return run

        return [stage(index) for index in range(5)]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool4(x).flatten(1))
