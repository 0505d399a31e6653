"""``task=cache_teacher``: write the teacher's outputs for N epochs of training views ahead of time.

``task=distill teacher.cache=DIR`` uses the same code: it fills whatever epochs the run needs and are
not stored yet, then trains without running the teacher (see ``kd.teachers.cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

import lightning as L
import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from kd.data import ClassificationData
from kd.data.views import SeededViews, ViewSampler, check_reproducible
from kd.errors import KdError
from kd.tasks.common import build_data, build_teacher, output_dir, write_results
from kd.tasks.pretrain import PretrainedCache
from kd.teachers import FrozenTeacher
from kd.teachers.cache import CachedTeacher, EpochFiller, TeacherOutputStore, resolve_topk

log = logging.getLogger("kd")

# Data settings that decide neither the samples nor their views.
LOADER_KEYS = ("num_workers", "eval_batch_size", "batch_size")


def content_digest(dataset: Dataset) -> str | None:
    """sha256 of what the training samples are, where the dataset exposes it cheaply: the file list of
    an ImageFolder (relative paths and classes), the tensors of the digits set, the arrays of CIFAR."""
    digest = hashlib.sha256()
    if hasattr(dataset, "samples"):
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


def teacher_identity(cfg: DictConfig, teacher: FrozenTeacher, data: ClassificationData, k: int) -> dict:
    """Everything that decides the stored values, and nothing else: not the loss, the student, the
    optimizer, the batch size or the number of workers, so a sweep over those shares one cache."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        "teacher": {
            "name": cfg.teacher.get("name"),
            "arch": OmegaConf.to_container(cfg.teacher.arch, resolve=True),
            "fingerprint": teacher.start_fingerprint,
            "preprocessing": teacher.preprocessing.to_dict(),
        },
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "data": {
            "config": {key: value for key, value in data_cfg.items() if key not in LOADER_KEYS},
            "samples": len(data.train_set),
            "classes": data.num_classes,
            "content": content_digest(data.train_set),
        },
        "views": data.train_views().describe(),
        "seed": int(cfg.seed),
        "k": k,
        # Mixup and CutMix change the teacher's input: when they land, their settings (and the batch
        # composition they depend on) belong here, see the README's Performance section.
        "mixup": None,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def teacher_filler(
    teacher: FrozenTeacher, views: SeededViews, batch_size: int, num_workers: int, fabric: L.Fabric
) -> EpochFiller:
    """Runs the teacher over every view of an epoch, exactly as the training step would: same views,
    same device, same precision (Lightning's precision plugin for ``trainer.precision``)."""
    precision = fabric.strategy.precision

    def fill(epoch: int, write) -> None:
        sampler = ViewSampler(len(views), views.seed, shuffle=False, epoch=epoch)
        loader = DataLoader(views, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
        for images, _, view_ids in loader:
            images = precision.convert_input(images.to(fabric.device))
            with precision.forward_context():
                logits = teacher(images)
            write(view_ids[:, 1].numpy(), logits)

    return fill


def epochs_to_cover(cfg: DictConfig, data: ClassificationData) -> int:
    """The number of training epochs the run will start: ``trainer.max_epochs``, or what ``max_steps`` needs."""
    trainer = cfg.trainer
    max_epochs = trainer.get("max_epochs") or -1
    max_steps = trainer.get("max_steps") or -1
    candidates = [max_epochs] if max_epochs > 0 else []
    if max_steps > 0:
        batches = max(1, len(data.train_set) // data.batch_size)
        candidates.append(math.ceil(max_steps * (trainer.get("accumulate_grad_batches") or 1) / batches))
    if not candidates:
        raise KdError(
            "teacher.cache needs to know how many epochs to store, but trainer.max_epochs and trainer.max_steps "
            "are both unlimited; set trainer.max_epochs"
        )
    return min(candidates)


def open_teacher_cache(
    cfg: DictConfig, teacher: FrozenTeacher, data: ClassificationData, epochs: int
) -> tuple[TeacherOutputStore, list[int]]:
    """The store for this run under ``teacher.cache``, with epochs ``0 .. epochs-1`` written."""
    if teacher.bn_train_mode:
        raise KdError(
            "teacher.bn_train_mode=true makes each teacher output depend on the whole batch, so it cannot be "
            "stored per view; use teacher.cache=null or teacher.bn_train_mode=false"
        )
    views = data.train_views()
    check_reproducible(views)
    k = resolve_topk(cfg.teacher.get("cache_topk", "auto"), data.num_classes)
    identity = teacher_identity(cfg, teacher, data, k)
    store = TeacherOutputStore.under(
        cfg.teacher.cache,
        str(cfg.teacher.get("name", "teacher")),
        identity,
        num_samples=len(views),
        num_classes=data.num_classes,
        k=k,
    )
    fabric = L.Fabric(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, precision=cfg.trainer.precision)
    fill = teacher_filler(teacher, views, data.eval_batch_size, data.num_workers, fabric)
    written = store.ensure(range(epochs), fill)
    reused = epochs - len(written)
    if reused:
        log.info("teacher outputs: reusing %d of %d epochs stored in %s", reused, epochs, store.folder)
    return store, written


def cached_teacher(cfg: DictConfig, teacher: FrozenTeacher, data: ClassificationData) -> CachedTeacher:
    store, _ = open_teacher_cache(cfg, teacher, data, epochs_to_cover(cfg, data))
    return CachedTeacher(teacher, store)


def cache_teacher(cfg: DictConfig, epochs: int | None = None) -> dict:
    start = time.perf_counter()
    if not cfg.teacher.get("cache"):
        raise KdError("task=cache_teacher needs a folder to write to; pass teacher.cache=DIR")
    out = output_dir(cfg)
    data = build_data(cfg, cfg.student)
    obtain_auto = PretrainedCache(cfg.paths.cache_dir, cfg.data, data, cfg.trainer.get("accelerator", "auto"))
    teacher = build_teacher(cfg, data.num_classes, obtain_auto)
    count = epochs if epochs is not None else epochs_to_cover(cfg, data)
    if count < 1:
        raise KdError(f"task.epochs={count} must be at least 1")
    store, written = open_teacher_cache(cfg, teacher, data, count)
    results = {
        "metrics": {},
        "cache": str(store.folder),
        "epochs": count,
        "epochs_written": written,
        "teacher_fingerprint": {"start": teacher.start_fingerprint, "end": teacher.check_unchanged()},
        "wall_time_s": round(time.perf_counter() - start, 3),
        "output_dir": str(out),
    }
    write_results(out, cfg, "cache_teacher", **results)
    log.info(
        "teacher outputs for epochs 0-%d are in %s (%d written now, %d reused)",
        count - 1,
        store.folder,
        len(written),
        count - len(written),
    )
    return results
