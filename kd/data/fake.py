from __future__ import annotations

from typing import Any

import torch
from torchvision.datasets import FakeData
from torchvision.transforms import v2 as T

from kd.data.base import ClassificationData


class FakeImageData(ClassificationData):
    """torchvision FakeData: random images for smoke tests only, never for accuracy claims."""

    def __init__(
        self,
        num_classes: int = 1000,
        image_size: int | None = 32,
        train_size: int = 64,
        val_size: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        **unlabeled: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, **unlabeled)
        self.image_size = image_size
        self.train_size = train_size
        self.val_size = val_size
        self.class_names = [str(i) for i in range(num_classes)]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        size = self.image_size or 32
        view = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        self.train_set = FakeData(self.train_size, (3, size, size), self.num_classes, view, random_offset=0)
        self.val_set = FakeData(self.val_size, (3, size, size), self.num_classes, view, random_offset=10**6)
        self.add_unlabeled(T.Compose([T.Resize((size, size), antialias=True), view]))
