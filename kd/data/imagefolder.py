"""ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

Bad files (unreadable, empty, not an image) are found twice: at setup, every file's first bytes are checked
against the image formats torchvision reads (in parallel threads: it costs a small read per file, not a
decode), and when a file fails to decode during the run (a truncated JPEG passes the header check).
``bad_images=stop`` (default) stops with the file named; ``bad_images=skip`` leaves it out and counts it.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from kd.data.base import ClassificationData
from kd.data.image_files import BAD_IMAGE_POLICIES, BadImage, image_problems, load_rgb, readable_samples, visible
from kd.data.transforms import eval_view, train_view
from kd.errors import KdError

log = logging.getLogger("kd")


def class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise KdError(f"data folder {split_dir} does not exist; set data.root to a folder with train/ and val/")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and visible(p.name))
    if not classes:
        raise KdError(f"data folder {split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    return classes


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder that handles bad files by policy instead of failing hours into a run."""

    def __init__(self, root: str, transform: Any, bad_images: str = "stop", check_headers: bool = True) -> None:
        self.bad_images = bad_images
        self.check_headers = check_headers
        self.skipped: dict[str, str] = {}
        super().__init__(root, transform=transform, loader=load_rgb)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))  # hidden folders (.ipynb_checkpoints) are no classes
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list:
        candidates = []
        for name, index in class_to_idx.items():
            folder = os.path.join(directory, name)
            files = [
                os.path.join(root, file)
                for root, _, names in sorted(os.walk(folder, followlinks=True))
                for file in sorted(names)
                if visible(file)
            ]
            if not files:
                raise KdError(f"class folder {folder} has no images; put its images there or remove the folder")
            candidates += [(path, index) for path in files]
        if self.check_headers:
            problems = image_problems([path for path, _ in candidates])
        else:  # decode errors are still caught when a file is loaded
            problems = [None if p.lower().endswith(IMG_EXTENSIONS) else "is not an image file" for p, _ in candidates]
        samples = readable_samples(candidates, problems, self, directory)
        for name, index in class_to_idx.items():
            if not any(i == index for _, i in samples):
                raise KdError(f"class folder {os.path.join(directory, name)} has no readable image; add some")
        return samples

    def handle(self, bad: BadImage) -> None:
        if self.bad_images == "stop":
            raise KdError(
                f"image file {bad.path} {bad.reason}; remove or replace it, or pass data.bad_images=skip to leave "
                "such files out"
            )
        if bad.path not in self.skipped:
            self.skipped[bad.path] = bad.reason

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """A file that fails to decode is handled by the policy; ``skip`` serves the next sample in its place."""
        for offset in range(len(self.samples)):
            try:
                return super().__getitem__((index + offset) % len(self.samples))
            except BadImage as bad:
                if bad.path not in self.skipped:
                    log.warning("data.bad_images=skip: %s %s; serving the next image instead", bad.path, bad.reason)
                self.handle(bad)
        raise KdError(f"no image under {self.root} can be decoded; check the dataset")


class ImageFolderData(ClassificationData):
    """``image_size``, ``interpolation`` and ``crop_pct`` default to the student's own (null here)."""

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 4,
        image_size: int | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        num_classes: int | None = None,
        eval_batch_size: int | None = None,
        bad_images: str = "stop",
        check_headers: bool = True,
        **unlabeled: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size, bad_images=bad_images, **unlabeled)
        if root in (None, "", "???"):
            raise KdError("data.root is not set; pass data.root=/path/to/dataset with train/ and val/ inside")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise KdError(f"data.bad_images={bad_images} is unknown; use stop or skip")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.interpolation = interpolation or "bilinear"
        self.crop_pct = crop_pct or 0.875
        self.expected_classes = num_classes
        self.bad_images = bad_images
        self.check_headers = check_headers
        train_classes = class_folders(self.root / "train")
        val_classes = class_folders(self.root / "val")
        if train_classes != val_classes:
            only = sorted(set(train_classes) ^ set(val_classes))[:5]
            raise KdError(
                f"train/ and val/ under {self.root} have different class folders (e.g. {only}); "
                "give both splits the same classes"
            )
        if num_classes is not None and len(train_classes) != num_classes:
            raise KdError(
                f"{self.root} has {len(train_classes)} class folders but data.num_classes={num_classes}; "
                "fix the folder or the setting"
            )
        self.class_names = train_classes

    def split(self, name: str, transform: Any) -> CheckedImageFolder:
        return CheckedImageFolder(str(self.root / name), transform, self.bad_images, self.check_headers)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        size = self.image_size or 224
        self.train_set = self.split("train", train_view(size, self.interpolation))
        self.val_set = self.split("val", eval_view(size, self.interpolation, self.crop_pct))
        self.add_unlabeled(self.train_set.transform)

    def own_view_set(self, image_size: int, interpolation: str, crop_pct: float) -> CheckedImageFolder | None:
        """The validation images resized and cropped as a model of that size, interpolation and crop expects."""
        own = (image_size, interpolation, float(crop_pct))
        if own == (self.image_size or 224, self.interpolation, float(self.crop_pct)):
            return None
        own_set = copy.copy(self.val_set)  # the same checked samples (the folder is not walked again), another view
        own_set.transform = eval_view(*own)
        own_set.skipped = dict(self.val_set.skipped)  # its own record of files skipped while loading
        return own_set
