"""``task=cache_teacher``: write the teacher's outputs for N epochs of training views ahead of time
(``kd.teachers.fill`` fills them; ``task=distill teacher.cache=DIR`` reads them)."""

from __future__ import annotations

import logging
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.tasks.auto_weights import auto_weights
from kd.tasks.checks import cache_refusals
from kd.tasks.common import build_data, output_dir, planned_trainer
from kd.tasks.models import build_teacher, cache_settings
from kd.tasks.records import write_results
from kd.teachers.fill import check_teacher_cache, epochs_to_cover, open_teacher_cache

log = logging.getLogger("kd")


def cache_teacher(cfg: DictConfig, epochs: int | None = None) -> dict:
    start = time.perf_counter()
    if not cfg.teacher.get("cache"):
        raise KdError("task=cache_teacher needs a folder to write to; pass teacher.cache=DIR")
    check_teacher_cache(cache_settings(cfg), None, **cache_refusals(cfg))
    # Seeded as task=distill is, so a teacher with weights=none gets the same random weights (and fingerprint).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = output_dir(cfg)
    data = build_data(cfg, cfg.student)
    obtain_auto = auto_weights(cfg, data)
    mixup = instantiate(cfg.mixup) if cfg.get("mixup") else None
    planned = planned_trainer(cfg)
    world_size = planned.world_size if mixup is not None else 1  # without mixup it does not matter
    teacher = build_teacher(cfg, data.num_classes, obtain_auto)
    count = epochs if epochs is not None else epochs_to_cover(planned, data)
    if count < 1:
        raise KdError(f"task.epochs={count} must be at least 1")
    store, written = open_teacher_cache(cache_settings(cfg), teacher, data, count, mixup, world_size)
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
