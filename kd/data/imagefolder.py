"""ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*``."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from kd.data.base import ClassificationData
from kd.data.transforms import eval_view, train_view
from kd.errors import KdError


def class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise KdError(f"data folder {split_dir} does not exist; set data.root to a folder with train/ and val/")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise KdError(f"data folder {split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    return classes


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
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if root in (None, "", "???"):
            raise KdError("data.root is not set; pass data.root=/path/to/dataset with train/ and val/ inside")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.interpolation = interpolation or "bilinear"
        self.crop_pct = crop_pct or 0.875
        self.expected_classes = num_classes
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

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        size = self.image_size or 224
        self.train_set = ImageFolder(str(self.root / "train"), transform=train_view(size, self.interpolation))
        self.val_set = ImageFolder(str(self.root / "val"), transform=eval_view(size, self.interpolation, self.crop_pct))
