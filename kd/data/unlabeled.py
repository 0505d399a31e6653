"""Unlabeled training images, and label-scarce splits of any dataset (SSLD's setting: the teacher labels them).

- ``data.unlabeled=DIR``: every image file under DIR (searched recursively, no class folders) joins the training
  set with target ``UNLABELED`` (-1). It gets the data module's training transform, so it is seeded, cached and
  sampled exactly like a labeled image.
- ``data.labeled_fraction=F``: a stratified fraction F of the training split keeps its labels (drawn with
  ``data.split_seed``); the other images stay in the training set with target -1. Their true labels are never
  loaded into a batch.
- ``data.unlabeled_ratio=R``: every training batch holds ``round(R * batch_size)`` unlabeled images
  (``RatioSampler``); null: the natural mix (one shuffled pass over all training images per epoch).

The training set is then a ``TrainingSet``: indices ``0 .. num_labeled-1`` are the labeled images, the rest the
unlabeled ones, so a view id (index, epoch) names the same image whatever the sampler does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kd.data.image_files import BAD_IMAGE_POLICIES, BadImage, image_problems, load_rgb, readable_samples, visible
from kd.errors import KdError

log = logging.getLogger("kd")

#: The target of an image without a label (hard labels); mixed soft labels carry it as a row summing to < 1.
UNLABELED = -1


def describe(dataset: Dataset) -> str:
    """A stable description of how a dataset makes its samples (no memory addresses: it keys the teacher cache)."""
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        return repr(transform)
    inner = getattr(dataset, "dataset", None)
    return describe(inner) if inner is not None else repr(dataset)


class UnlabeledFolder(Dataset):
    """Every image file under ``root`` (recursive, hidden files and folders left out), target ``UNLABELED``.

    Bad files follow ``bad_images`` as in ``kd.data.imagefolder``: found by their first bytes at setup, or when
    decoding fails; ``stop`` names the file and stops, ``skip`` leaves it out (decode failures: the next image
    is served in its place).
    """

    def __init__(self, root: str | Path, transform: Callable, bad_images: str = "stop") -> None:

        if bad_images not in BAD_IMAGE_POLICIES:
            raise KdError(f"data.bad_images={bad_images} is unknown; use stop or skip")
        self.root = str(Path(root).expanduser())
        self.transform = transform
        self.bad_images = bad_images
        self.skipped: dict[str, str] = {}
        if not Path(self.root).is_dir():
            raise KdError(f"data.unlabeled={root} is not a folder; point it at a folder of images or set it to null")
        files = [
            os.path.join(folder, name)
            for folder, dirs, names in sorted(os.walk(self.root, followlinks=True))
            for name in sorted(names)
            if visible(name) and not any(part.startswith(".") for part in Path(folder).relative_to(self.root).parts)
        ]
        candidates = [(path, UNLABELED) for path in files]
        self.samples = readable_samples(candidates, image_problems(files), self, self.root)
        if not self.samples:
            raise KdError(f"data.unlabeled={root} holds no readable image file; put images there or set it to null")

    def handle(self, bad: Any) -> None:
        if self.bad_images == "stop":
            raise KdError(
                f"unlabeled image file {bad.path} {bad.reason}; remove or replace it, or pass data.bad_images=skip "
                "to leave such files out"
            )
        self.skipped.setdefault(bad.path, bad.reason)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:

        for offset in range(len(self.samples)):
            path = self.samples[(index + offset) % len(self.samples)][0]
            try:
                return self.transform(load_rgb(path)), UNLABELED
            except BadImage as bad:
                if bad.path not in self.skipped:
                    log.warning("data.bad_images=skip: %s %s; serving the next image instead", bad.path, bad.reason)
                self.handle(bad)
        raise KdError(f"no image under data.unlabeled={self.root} can be decoded; check the folder")

    def __repr__(self) -> str:
        return f"UnlabeledFolder(images={len(self)}, transform={self.transform!r})"


class Part(Dataset):
    """The samples ``indices`` of ``dataset``; ``hide_labels`` replaces every target by ``UNLABELED``."""

    def __init__(self, dataset: Dataset, indices: list[int], hide_labels: bool = False) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.hide_labels = hide_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[self.indices[index]]
        return image, UNLABELED if self.hide_labels else target

    def __repr__(self) -> str:
        return f"Part({len(self)} of {describe(self.dataset)}, hide_labels={self.hide_labels})"


class TrainingSet(Dataset):
    """Labeled images first (indices ``0 .. num_labeled-1``), then every unlabeled part in order."""

    def __init__(self, labeled: Dataset, unlabeled: list[Dataset]) -> None:
        self.labeled = labeled
        self.unlabeled = list(unlabeled)
        self.num_labeled = len(labeled)
        self.num_unlabeled = sum(len(part) for part in self.unlabeled)
        self.offsets = np.cumsum([self.num_labeled, *(len(part) for part in self.unlabeled)])

    def __len__(self) -> int:
        return self.num_labeled + self.num_unlabeled

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < self.num_labeled:
            return self.labeled[index]
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.unlabeled[part][index - int(self.offsets[part])]

    def content_parts(self) -> list[Dataset | bytes]:
        """What decides the samples, for the teacher cache's content digest: datasets and index lists."""
        parts: list[Dataset | bytes] = []
        for dataset in (self.labeled, *self.unlabeled):
            if isinstance(dataset, Part):
                parts += [dataset.dataset, np.asarray(dataset.indices, dtype=np.int64).tobytes()]
            else:
                parts.append(dataset)
        return parts

    def __repr__(self) -> str:
        unlabeled = ", ".join(describe(part) for part in self.unlabeled)
        return f"TrainingSet(labeled={describe(self.labeled)}, unlabeled=[{unlabeled}])"


def labels_of(dataset: Dataset) -> np.ndarray:
    """The class index of every sample (from ``targets``/``labels`` where the dataset has them, else loaded)."""
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise KdError(f"data.labeled_fraction={fraction} must lie in (0, 1]; e.g. 0.1 keeps 10% of the labels")
    return float(fraction)


def stratified_fraction(
    labels: np.ndarray, fraction: float, seed: int, class_names: list[str]
) -> tuple[list[int], list[int]]:
    """(kept, hidden) sample indices: per class, ``round(fraction * count)`` samples keep their label, drawn
    with ``seed``; both lists in ascending order. Refuses a fraction that leaves a class with no label."""
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(math.floor(fraction * len(members) + 0.5))
        if count == 0:
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            raise KdError(
                f"data.labeled_fraction={fraction} leaves class {name} ({len(members)} training images) without a "
                f"labeled image; use a fraction of at least {0.5 / len(members):.3g}"
            )
        kept += rng.permutation(members)[:count].tolist()
    kept_set = set(kept)
    return sorted(kept), [i for i in range(len(labels)) if i not in kept_set]


def check_labels_reach_loss(data: Any, loss: Any) -> None:
    """Refuses a label-only loss (``loss=ce``) when no training batch holds a labeled image
    (``data.unlabeled_ratio=1``), and logs how many labeled and unlabeled images the run trains on."""
    unlabeled_only = getattr(data, "ratio_mode", lambda: False)() and data.unlabeled_per_batch == data.batch_size
    if not loss.uses_teacher and unlabeled_only:
        raise KdError(
            f"loss {type(loss).__name__} learns from labels only, but data.unlabeled_ratio=1 trains on unlabeled "
            "images only; choose a distillation loss (e.g. loss=soft_ce) or a ratio below 1"
        )
    if data.num_unlabeled:
        mix = "natural mix" if data.unlabeled_ratio is None else f"{data.unlabeled_per_batch} of {data.batch_size}"
        log.info(
            "training images: %d labeled, %d unlabeled (%s per batch); label terms count the labeled ones only",
            data.num_labeled,
            data.num_unlabeled,
            mix,
        )
        if not loss.uses_teacher:
            log.warning("loss %s uses labels only: the unlabeled images teach it nothing", type(loss).__name__)
    else:
        log.info("training images: %d labeled, 0 unlabeled", data.num_labeled)


def training_images(data: Any) -> dict[str, int]:
    """The counts results.json records: distinct labeled and unlabeled training images of the run."""
    return {"labeled": int(data.num_labeled), "unlabeled": int(data.num_unlabeled)}
