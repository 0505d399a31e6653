"""Filling the teacher-output cache (``kd.teachers.cache``) for a run, and the teacher a run gets.

``task=cache_teacher`` writes the teacher's outputs for N epochs of training views ahead of time;
``task=distill teacher.cache=DIR`` uses the same code: it fills whatever epochs the run needs and are
not stored yet, then trains without running the teacher.

Without mixup a view depends on (seed, epoch, sample index) only, so the filler runs the teacher over every
sample of an epoch in index order, in batches of ``data.eval_batch_size``. With mixup/cutmix the teacher's input
is a mixed batch, which also depends on the batch's composition (the partner of image i is image N-1-i) and on
(seed, rank, epoch, batch index): the filler then replays the training batches exactly (each process's
sampler, ``data.batch_size``, the same ``BatchMixup`` call with the same key) and stores, per (epoch, sample),
the teacher's output on the mixed image the student trains on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision
from lightning.fabric.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from kd.data import ClassificationData
from kd.data.mixup import BatchMixup
from kd.data.sampling import SeededViews, check_reproducible
from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.teachers.cache import CachedTeacher, EpochFiller, TeacherOutputStore, resolve_topk
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.precision import computed_precisions
from kd.training.steps import planned_steps

log = logging.getLogger("kd")


@dataclass(frozen=True)
class CacheSettings:
    """``teacher.cache`` as a run sets it: the folder, the logits kept per view (``cache_topk``), and what decides
    the stored values besides the teacher's weights: the seed, the device and precision the teacher runs in
    (``trainer.precision``, as in the training step), the teacher entry's name and arch settings, and the data's
    settings."""

    folder: str
    topk: int | str = "auto"
    seed: int = 0
    accelerator: str = "auto"
    precision: str = "32-true"
    teacher_name: str | None = None
    teacher_arch: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)


def check_teacher_cache(
    cache: CacheSettings | None, loss: DistillationLoss | None, bn_train_mode: bool = False, overfit_batches: float = 0
) -> None:
    """``teacher.cache`` stores the teacher's logits per seeded training view; refuse what it cannot serve."""
    if cache is None:
        return
    if bn_train_mode:
        raise KdError(
            "teacher.bn_train_mode=true makes each teacher output depend on the whole batch, so it cannot be "
            "stored per view; use teacher.cache=null or teacher.bn_train_mode=false"
        )
    if loss is not None and loss.uses_teacher and loss.feature_stages().teacher:
        raise KdError(
            f"loss {type(loss).__name__} compares the teacher's feature maps, but teacher.cache={cache.folder} "
            "stores the teacher's logits only; use teacher.cache=null with feature losses"
        )
    if overfit_batches:
        raise KdError(
            f"trainer.overfit_batches={overfit_batches} replaces the seeded training sampler, so the "
            "views cannot be looked up in teacher.cache; use teacher.cache=null to overfit a few batches"
        )


# Data settings that decide neither the samples nor their views.
LOADER_KEYS = ("num_workers", "eval_batch_size", "batch_size")


def content_digest(dataset: Dataset) -> str | None:
    """sha256 of what the training samples are, where the dataset exposes it cheaply: the file list of
    an ImageFolder (relative paths and classes), the tensors of the digits set, the arrays of CIFAR."""
    digest = hashlib.sha256()
    if hasattr(dataset, "content_parts"):  # kd.data.unlabeled.TrainingSet: labeled and unlabeled parts
        for part in dataset.content_parts():
            part_digest = part.hex() if isinstance(part, bytes) else content_digest(part)
            if part_digest is None:
                return None
            digest.update(part_digest.encode())
    elif hasattr(dataset, "samples"):
        prefix = str(getattr(dataset, "root", "")).rstrip("/") + "/"  # the config already says where they are
        relative = [(path.removeprefix(prefix), label) for path, label in dataset.samples]
        digest.update(json.dumps(relative).encode())
    elif isinstance(getattr(dataset, "images", None), torch.Tensor):
        for tensor in (dataset.images, dataset.labels):
            digest.update(tensor.contiguous().numpy().tobytes())
    elif hasattr(dataset, "data") and hasattr(dataset, "targets"):
        digest.update(np.ascontiguousarray(dataset.data).tobytes())
        digest.update(np.asarray(dataset.targets).tobytes())
    else:
        return None
    return digest.hexdigest()


def teacher_identity(
    cache: CacheSettings,
    teacher: FrozenTeacher,
    data: ClassificationData,
    views: SeededViews,
    k: int,
    mixup: BatchMixup | None = None,
    world_size: int = 1,
    device_type: str = "cpu",
) -> dict:
    """Everything that decides the stored values, and nothing else: not the loss, the student, the optimizer
    or the number of workers, so a sweep over those shares one cache. Without mixup not the batch size or the
    number of processes either; with mixup they decide which images are mixed together, so they count."""
    return {
        "teacher": {
            "name": cache.teacher_name,
            "arch": cache.teacher_arch,
            "fingerprint": teacher.start_fingerprint,
            "preprocessing": teacher.preprocessing.to_dict(),
            **teacher_views(teacher),
            **computed_in(teacher, device_type),
        },
        "precision": cache.precision,
        "data": {
            "config": {key: value for key, value in cache.data_config.items() if key not in LOADER_KEYS},
            "samples": len(data.train_set),
            "classes": data.num_classes,
            "content": content_digest(data.train_set),
        },
        "views": views.describe(),  # the teacher's view (teacher.view) is part of it when not the student's
        "seed": cache.seed,
        "k": k,
        "mixup": mixup_identity(mixup, data.batch_size, world_size),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def teacher_views(teacher: FrozenTeacher | EnsembleTeacher) -> dict:
    """What the identity adds for a teacher that sees the student's view resized, or for an ensemble (every
    member's name, fingerprint, preprocessing and size, and how they are combined); nothing otherwise, so the
    caches of plain teachers keep their keys."""
    if isinstance(teacher, EnsembleTeacher):
        return {"ensemble": teacher.describe()}
    return {"resize_to": list(teacher.resize_to)} if getattr(teacher, "resize_to", None) else {}


def computed_in(teacher: FrozenTeacher | EnsembleTeacher, device_type: str) -> dict:
    """The teacher's own precision on the filling device when it is reduced (bf16, 16): its outputs differ from
    float32's. Nothing for float32, so the caches of float32 teachers keep their keys."""
    precisions = computed_precisions(teacher, device_type)
    return {} if precisions == ["32"] else {"precision": precisions}


def mixup_identity(mixup: BatchMixup | None, batch_size: int, world_size: int) -> dict | None:
    if mixup is None:
        return None
    return {"settings": mixup.settings, "seed": mixup.seed, "batch_size": batch_size, "world_size": world_size}


def run_teacher(teacher: FrozenTeacher, images: torch.Tensor, fabric: L.Fabric) -> torch.Tensor:
    """The teacher's logits as the training step gets them: same device, same precision (Lightning's
    precision plugin for ``trainer.precision``)."""
    precision = fabric.strategy.precision
    # Lightning's Trainer hands a mixed-precision step its float32 batch as it is (autocast casts inside each op);
    # Fabric's MixedPrecision would round the images to bf16/fp16 first. Only a true half precision converts them.
    if not isinstance(precision, MixedPrecision):
        images = precision.convert_input(images)
    with precision.forward_context():
        return teacher(images)


def view_filler(teacher: FrozenTeacher, views: SeededViews, data: ClassificationData, fabric: L.Fabric) -> EpochFiller:
    """Every view of an epoch, in sample order (without mixup a view does not depend on its batch)."""

    def fill(epoch: int, write) -> None:
        keys = [(index, epoch) for index in range(len(views))]
        loader = DataLoader(views, batch_size=data.eval_batch_size, sampler=keys, num_workers=data.num_workers)
        for batch in loader:
            images = batch[3] if len(batch) > 3 else batch[0]  # the teacher's own view (teacher.view), if any
            write(batch[2][:, 0].numpy(), run_teacher(teacher, images.to(fabric.device), fabric))

    return fill


def mixup_filler(
    teacher: FrozenTeacher,
    data: ClassificationData,
    mixup: BatchMixup,
    world_size: int,
    seed: int,
    fabric: L.Fabric,
) -> EpochFiller:
    """The training batches of an epoch of every process, mixed exactly as ``DistillationModule.training_step``
    mixes them (key: rank, epoch, batch index), each stored under its views' sample indices."""

    def fill(epoch: int, write) -> None:
        filled = np.zeros(len(data.train_set), dtype=bool)
        for rank in range(world_size):
            loader = data.training_loader(world_size, rank, seed, start_epoch=epoch)
            for batch_idx, (images, target, view_ids, *own) in enumerate(loader):
                images = own[0] if own else images  # the teacher's own view (teacher.view), mixed alike
                images, target = images.to(fabric.device), target.to(fabric.device)
                mixed, _ = mixup(images, target, data.num_classes, (rank, epoch, batch_idx))
                indices = view_ids[:, 0].numpy()
                if filled[indices].any() or len(set(indices.tolist())) < len(indices):
                    raise_repeated_sample(len(data.train_set), world_size, data.batch_size)
                filled[indices] = True
                write(indices, run_teacher(teacher, mixed, fabric))

    return fill


def raise_repeated_sample(num_samples: int, world_size: int, batch_size: int) -> None:
    raise KdError(
        f"with mixup, teacher.cache stores one mixed view per sample and epoch, but {num_samples} training images "
        f"do not split evenly over {world_size} processes, so the sampler trains on some images twice per epoch "
        f"(with data.batch_size={batch_size}); use a number of processes that divides the training set, or "
        "teacher.cache=null"
    )


def epochs_to_cover(trainer: L.Trainer, data: ClassificationData) -> int:
    """The number of training epochs the run will start, counted as Lightning counts its steps."""
    if trainer.max_epochs == -1 and trainer.max_steps == -1:
        raise KdError(
            "teacher.cache needs to know how many epochs to store, but trainer.max_epochs and trainer.max_steps "
            "are both unlimited; set trainer.max_epochs"
        )
    total, per_epoch = planned_steps(trainer, data)
    return math.ceil(total / per_epoch) if per_epoch > 0 else 0


def open_teacher_cache(
    cache: CacheSettings,
    teacher: FrozenTeacher,
    data: ClassificationData,
    epochs: int,
    mixup: BatchMixup | None = None,
    world_size: int = 1,
) -> tuple[TeacherOutputStore, list[int]]:
    """The store for this run under ``cache.folder``, with epochs ``0 .. epochs-1`` written (one record per
    image under ``teacher.view=fixed`` without mixup).

    Several processes (DDP ranks, parallel sweep jobs) may call it at once: the store's file lock lets the
    first one write each missing epoch while the others wait, then all of them read the same files."""
    seed = cache.seed
    views = SeededViews(data.train_set, seed, data.teacher_view)
    check_reproducible(views)
    # teacher.view=fixed: the teacher's input is the same in every epoch, so one record per image is enough;
    # mixup makes it depend on the batch again (its partner and weight), so then it is stored per view.
    per_image = data.teacher_view == "fixed" and mixup is None
    if per_image:
        epochs = 1
    k = resolve_topk(cache.topk, data.num_classes)
    fabric = L.Fabric(accelerator=cache.accelerator, devices=1, precision=cache.precision)
    identity = teacher_identity(cache, teacher, data, views, k, mixup, world_size, fabric.device.type)
    store = TeacherOutputStore.under(
        cache.folder,
        cache.teacher_name or "teacher",
        identity,
        num_samples=len(views),
        num_classes=data.num_classes,
        k=k,
        per_image=per_image,
    )
    if mixup is None:
        fill = view_filler(teacher, views, data, fabric)
    else:
        fill = mixup_filler(teacher, data, mixup, world_size, seed, fabric)
    written = store.ensure(range(epochs), fill, every_sample=mixup is None)
    reused = epochs - len(written)
    if reused:
        log.info("teacher outputs: reusing %d of %d epochs stored in %s", reused, epochs, store.folder)
    return store, written


def cached_teacher(
    cache: CacheSettings,
    teacher: FrozenTeacher,
    data: ClassificationData,
    mixup: BatchMixup | None,
    trainer: L.Trainer,
) -> CachedTeacher:
    epochs = epochs_to_cover(trainer, data)
    store, _ = open_teacher_cache(cache, teacher, data, epochs, mixup, trainer.world_size)
    return CachedTeacher(teacher, store)


def teacher_for_run(
    cache: CacheSettings | None,
    teacher: FrozenTeacher,
    loss: DistillationLoss,
    data: ClassificationData,
    mixup: BatchMixup | None,
    trainer: L.Trainer,
) -> FrozenTeacher | CachedTeacher:
    """The teacher the training step asks: the frozen one, or, with ``teacher.cache``, its stored outputs.

    The cache is filled here, before Lightning starts any extra DDP process."""
    if cache is not None and loss.uses_teacher:
        return cached_teacher(cache, teacher, data, mixup, trainer)
    return teacher
