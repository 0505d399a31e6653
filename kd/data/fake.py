from __future__ import annotations

from typing import Any

import torch
from torchvision.datasets import FakeData
from torchvision.transforms import v2 as T

from kd.data.augment import StrongTensorView, TrainView
from kd.data.base import ClassificationData


class SeededFakeData(FakeData):
    """torchvision's FakeData, image for image and label for label, drawn from a generator of its own.

    FakeData seeds torch's global generator for every image (``torch.manual_seed``), which also queues a lazy
    CUDA seeding call that records a Python stack trace, and then round-trips the image through PIL. Here
    each image comes from a private ``torch.Generator`` seeded the same way (index + offset) and is quantized
    to uint8 exactly as ``ToPILImage`` does, without PIL: the same tensors at a fraction of the cost, and the
    global generator (which ``SeededViews`` seeds per view) is left alone.
    """

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index >= len(self):
            raise IndexError(f"{type(self).__name__} index out of range")
        generator = torch.Generator().manual_seed(index + self.random_offset)
        image = torch.randn(*self.image_size, generator=generator)
        target = torch.randint(0, self.num_classes, size=(1,), dtype=torch.long, generator=generator)[0]
        image = image.mul(255).byte()  # what ToPILImage does to a float image, then ToImage gives back as CHW
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, int(target)


class FakeImageData(ClassificationData):
    """Random images (torchvision FakeData's) for smoke tests and benchmarks only, never for accuracy claims."""

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
        strong = StrongTensorView(self.augment, size, channels=3)
        train = TrainView(T.Compose([view, strong]), view) if strong.active else view  # fixed: the image itself
        self.train_set = SeededFakeData(self.train_size, (3, size, size), self.num_classes, train, random_offset=0)
        self.val_set = SeededFakeData(self.val_size, (3, size, size), self.num_classes, view, random_offset=10**6)
        self.add_unlabeled(T.Compose([T.Resize((size, size), antialias=True), train]))
