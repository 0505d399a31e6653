"""scikit-learn's bundled handwritten digits: 1,797 grayscale 8x8 images of 10 classes, no download."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from kd.data.augment import StrongTensorView, fixed_view_wanted
from kd.data.base import ClassificationData


def shift(image: torch.Tensor, max_shift: int) -> torch.Tensor:
    """``image`` (1, 8, 8) shifted by up to ``max_shift`` pixels each way, the gap filled with 0."""
    if not max_shift:
        return image
    pad = max_shift
    # torch's default generator: kd.data.sampling.SeededViews seeds it per (seed, epoch, index).
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return torch.nn.functional.pad(image, (pad, pad, pad, pad))[:, dy : dy + 8, dx : dx + 8]


def training_view(image: torch.Tensor, max_shift: int, strong: StrongTensorView | None) -> torch.Tensor:
    """The shift, then the strong augmentation (``kd.data.augment``); the image as it is for the teacher's fixed
    view (``teacher.view=fixed``): digits are already centred, so that is the un-augmented view."""
    if fixed_view_wanted():
        return image
    image = shift(image, max_shift)
    return strong(image) if strong is not None else image


class DigitsView:
    """A picture file as a digits training sample (for ``data.unlabeled``): grayscale, 8x8, ink bright (the
    darker the pixel, the higher its value, as in the digits set), then the training shift and augmentation."""

    def __init__(self, max_shift: int, strong: StrongTensorView | None = None) -> None:
        self.max_shift = max_shift
        self.strong = strong
        self.resize = T.Compose([T.Grayscale(), T.Resize((8, 8), antialias=True), T.ToImage()])

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        pixels = self.resize(picture).float() / 255.0
        return training_view(1.0 - pixels, self.max_shift, self.strong)

    def __repr__(self) -> str:
        strong = f", {self.strong!r}" if self.strong is not None and self.strong.active else ""
        return f"DigitsView(grayscale, 8x8, inverted, max_shift={self.max_shift}{strong})"


class ShiftedDigits(Dataset):
    """Digits as float tensors in [0, 1]; for training, each image shifted by up to ``max_shift`` pixels, then
    strongly augmented when ``strong`` is given (``kd.data.augment``)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0, strong: StrongTensorView | None = None
    ) -> None:
        self.images = images
        self.labels = labels
        self.max_shift = max_shift
        self.strong = strong if strong is not None and strong.active else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return training_view(self.images[index], self.max_shift, self.strong), int(self.labels[index])

    def __repr__(self) -> str:
        strong = f", {self.strong!r}" if self.strong is not None else ""
        return f"ShiftedDigits(images={len(self)}, max_shift={self.max_shift}{strong})"


class DigitsData(ClassificationData):
    """Fixed split: stratified, ``val_fraction`` of the images for validation, shuffled with ``split_seed``.
    The defaults (0.2, seed 0) give 1,437 training and 360 validation images."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        max_shift: int = 1,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        **unlabeled: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size, split_seed=split_seed, **unlabeled)
        self.val_fraction = val_fraction
        self.max_shift = max_shift
        self.class_names = [str(d) for d in range(10)]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        train_idx, val_idx = train_test_split(
            range(len(labels)),
            test_size=self.val_fraction,
            random_state=self.split_seed,
            stratify=digits.target,
        )
        strong = StrongTensorView(self.augment, size=8, channels=1)
        self.train_set = ShiftedDigits(images[train_idx], labels[train_idx], self.max_shift, strong)
        self.val_set = ShiftedDigits(images[val_idx], labels[val_idx])
        self.add_unlabeled(DigitsView(self.max_shift, strong))
