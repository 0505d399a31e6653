"""``task=distill`` (a frozen teacher teaches a pretrained student) and ``task=train`` (labels only)."""

from __future__ import annotations

import logging
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.callbacks import TrainThroughput, ValidationHistory
from kd.module import DistillationModule
from kd.report import print_summary
from kd.tasks.common import (
    build_data,
    build_student,
    build_teacher,
    build_trainer,
    optimizer_factory,
    output_dir,
    validate,
    write_results,
)
from kd.tasks.pretrain import PretrainedCache

log = logging.getLogger("kd")


def distill(cfg: DictConfig) -> dict:
    return fit(cfg, task="distill")


def train(cfg: DictConfig) -> dict:
    return fit(cfg, task="train")


def fit(cfg: DictConfig, task: str) -> dict:
    start = time.perf_counter()
    out = output_dir(cfg)
    loss = instantiate(cfg.loss)
    optimizer = optimizer_factory(cfg)
    scheduler = instantiate(cfg.sched) if cfg.get("sched") else None
    data = build_data(cfg, cfg.student)
    obtain_auto = PretrainedCache(cfg.paths.cache_dir, cfg.data, data, cfg.trainer.get("accelerator", "auto"))
    teacher = build_teacher(cfg, data.num_classes, obtain_auto) if task == "distill" else None
    student = build_student(cfg, data.num_classes, obtain_auto)
    module = DistillationModule(student, loss, optimizer, scheduler, data.num_classes, teacher)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    throughput, history = TrainThroughput(), ValidationHistory()
    trainer = build_trainer(cfg, out, [throughput, history])
    before = validate(trainer, module, data)
    trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    after = validate(trainer, module, data)

    metrics = {
        **after,
        **{k.replace("student/", "student_init/"): v for k, v in before.items() if k.startswith("student/")},
    }
    extra = {}
    if teacher is not None:
        extra["teacher_fingerprint"] = {"start": teacher.start_fingerprint, "end": teacher.check_unchanged()}
    results = {
        "metrics": metrics,
        **extra,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "train_images_per_s": round(throughput.images_per_s, 2),
        "output_dir": str(out),
        "history": [{"epoch": 0, "step": 0, **before}, *history.records],  # validation after each epoch
    }
    if trainer.is_global_zero:
        write_results(out, cfg, task, **results)
        print_summary(task, metrics)
    return results
