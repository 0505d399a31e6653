"""``task=distill`` (a frozen teacher teaches a pretrained student) and ``task=train`` (labels only)."""

from __future__ import annotations

import logging
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.callbacks import TrainThroughput, ValidationHistory
from kd.card import CardInCheckpoint, card_for
from kd.checks import check_before_work
from kd.data.unlabeled import check_labels_reach_loss, training_images
from kd.export import export_student
from kd.module import DistillationModule
from kd.report import print_summary
from kd.resume import ResumePoint
from kd.tasks.cache_teacher import cached_teacher
from kd.tasks.common import (
    build_data,
    build_models,
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
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # models with weights=none start from this seed
    out = output_dir(cfg)
    loss = instantiate(cfg.loss)
    mixup = instantiate(cfg.mixup) if cfg.get("mixup") else None  # checks the batch size before any work
    optimizer = optimizer_factory(cfg)
    scheduler = instantiate(cfg.sched) if cfg.get("sched") else None
    data = build_data(cfg, cfg.student)
    if task == "train" and data.num_unlabeled:  # the honest baseline: labels only, no unlabeled image
        log.info("task=train trains on the %d labeled images alone, not on the %d unlabeled ones", data.num_labeled,
                 data.num_unlabeled)  # fmt: skip
        data = data.labeled_only()
    check_labels_reach_loss(data, loss)
    throughput, history = TrainThroughput(), ValidationHistory()
    card_callback = CardInCheckpoint(None)
    trainer = build_trainer(cfg, out, [throughput, history, card_callback])
    check_before_work(cfg, data, loss, scheduler, trainer)
    resume = ResumePoint.find(cfg.get("ckpt_path"), trainer)

    obtain_auto = PretrainedCache(cfg.paths.cache_dir, cfg.data, data, cfg.trainer.get("accelerator", "auto"))
    teacher, student = build_models(cfg, data.num_classes, obtain_auto, with_teacher=task == "distill")
    if teacher is not None and cfg.teacher.get("cache") and loss.uses_teacher:
        # Filled here, before Lightning starts any extra DDP process; the training step reads stored outputs.
        teacher = cached_teacher(cfg, teacher, data, mixup, trainer)
    # Seeded before the module: losses build their trainable parts (feature adapters) in it.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillationModule(student, loss, optimizer, scheduler, data.num_classes, teacher, mixup)
    if resume is not None:
        resume.check(module, teacher and teacher.start_fingerprint, data.batch_size, trainer.world_size)
    provenance = {"teacher": cfg.teacher.name, "teacher_fingerprint": teacher.start_fingerprint} if teacher else {}
    card = card_callback.card = card_for(student, data, model=cfg.student.get("name"), **provenance)

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # training does not depend on what ran before
    before = validate(trainer, module, data)
    trainer.fit(module, datamodule=data, ckpt_path=resume and resume.path)
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
        "world_size": trainer.world_size,
        "train_images": training_images(data),
        "output_dir": str(out),
        "history": [{"epoch": 0, "step": 0, **before}, *history.records],  # validation after each epoch
    }
    if trainer.is_global_zero:
        export_student(student, card, out, ["safetensors"])  # student.safetensors + student.json
        write_results(out, cfg, task, **results)
        print_summary(task, metrics)
    return results
