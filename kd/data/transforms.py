"""Standard ImageNet-style views; normalization is left to each model (see kd.models.Classifier)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T


def train_view(size: int, interpolation: str = "bilinear") -> T.Compose:
    """RandomResizedCrop + horizontal flip, as in the ResNet50_vd and SSLD recipes."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, interpolation=InterpolationMode(interpolation), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


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
