"""Standard ImageNet-style views; normalization is left to each model (see kd.models.Classifier)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from kd.data.augment import Augment, strong_tail


def train_view(size: int, interpolation: str = "bilinear", augment: Augment | None = None) -> T.Compose:
    """RandomResizedCrop + horizontal flip, as in the ResNet50_vd and SSLD recipes; with ``augment``, its crop
    scale and ratio and timm's strong augmentation after the flip (``kd.data.augment``)."""
    augment = augment or Augment()
    crop = T.RandomResizedCrop(
        size,
        scale=augment.scale or (0.08, 1.0),
        ratio=augment.ratio or (3 / 4, 4 / 3),
        interpolation=InterpolationMode(interpolation),
        antialias=True,
    )
    if not augment.strong:
        return T.Compose([T.ToImage(), crop, T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True)])
    # timm's auto-augment ops take PIL images: crop and flip the PIL image, then augment, then the tensor.
    return T.Compose([crop, T.RandomHorizontalFlip(), *strong_tail(augment, size, 3, interpolation)])


def eval_view(size: int, interpolation: str = "bilinear", crop_pct: float = 0.875) -> T.Compose:
    """Resize the short side to size / crop_pct, then center-crop ``size`` (224 -> 256 -> 224)."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(math.floor(size / crop_pct), interpolation=InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
