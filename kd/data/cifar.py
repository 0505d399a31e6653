from __future__ import annotations

from typing import Any

import torch
from torchvision import datasets
from torchvision.transforms import v2 as T

from kd.data.augment import TrainView, strong_tail
from kd.data.base import ClassificationData
from kd.errors import KdError


class CifarData(ClassificationData):
    """CIFAR-10/100 through torchvision; training views: 4-pixel padded random crop + flip."""

    def __init__(
        self,
        root: str,
        classes: int = 10,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        eval_batch_size: int | None = None,
        **unlabeled: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size, **unlabeled)
        if classes not in (10, 100):
            raise KdError(f"data.classes={classes} is not a CIFAR variant; use 10 or 100")
        self.root = root
        self.dataset = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
        self.download = download
        self.class_names = [str(i) for i in range(classes)]

    def prepare_data(self) -> None:
        try:
            self.dataset(self.root, train=True, download=self.download)
        except RuntimeError:
            raise KdError(
                f"CIFAR not found under {self.root}; pass data.download=true or point data.root at it"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        to_float = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        crop = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if self.augment.scale is not None or self.augment.ratio is not None:  # a random-resized crop asked for
            scale, ratio = self.augment.scale or (0.08, 1.0), self.augment.ratio or (3 / 4, 4 / 3)
            crop = [T.RandomResizedCrop(32, scale=scale, ratio=ratio), T.RandomHorizontalFlip()]
        tail = strong_tail(self.augment, 32, 3) if self.augment.strong else to_float
        train = TrainView(T.Compose([*crop, *tail]), T.Compose(to_float))  # fixed: the 32x32 image itself
        self.train_set = self.dataset(self.root, train=True, transform=train)
        self.val_set = self.dataset(self.root, train=False, transform=T.Compose(to_float))
        self.class_names = list(self.train_set.classes)
        self.add_unlabeled(T.Compose([T.Resize((32, 32), antialias=True), train]))  # unlabeled files: any size
