"""``task=distill`` (a frozen teacher teaches a pretrained student) and ``task=train`` (labels only)."""

from __future__ import annotations

import logging
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.module import DistillationModule
from kd.results.callbacks import TrainThroughput, ValidationHistory
from kd.results.files import write_results
from kd.results.report import print_summary
from kd.students.card import CardInCheckpoint, card_for
from kd.students.export import export_student
from kd.tasks.auto_weights import auto_weights
from kd.tasks.checks import check_before_work
from kd.tasks.common import build_data, build_models, build_trainer, optimizer_factory, output_dir, validate
from kd.teachers.ensemble import fingerprint_record
from kd.teachers.fill import teacher_for_run
from kd.teachers.views import teacher_view_metrics
from kd.training.resume import ResumePoint
from kd.weights.names import model_label

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
    throughput, history = TrainThroughput(), ValidationHistory()
    card_callback = CardInCheckpoint(None)
    trainer = build_trainer(cfg, out, [throughput, history, card_callback])
    check_before_work(cfg, data, loss, scheduler, trainer)
    resume = ResumePoint.find(cfg.get("ckpt_path"), trainer)

    teacher, student = build_models(cfg, data.num_classes, auto_weights(cfg, data), with_teacher=task == "distill")
    if teacher is not None:  # the frozen teacher, or its outputs stored in teacher.cache (filled here)
        teacher = teacher_for_run(cfg, teacher, loss, data, mixup, trainer)
    # Seeded before the module: losses build their trainable parts (feature adapters) in it.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillationModule(student, loss, optimizer, scheduler, data.num_classes, teacher, mixup)
    if resume is not None:
        resume.check(module, teacher and teacher.start_fingerprint, data.batch_size, trainer.world_size)
    provenance = {}
    if teacher is not None:  # the real teacher's name, not the option's (teacher=timm)
        provenance = {"teacher": model_label(cfg.teacher), "teacher_fingerprint": teacher.start_fingerprint}
    card = card_callback.card = card_for(student, data, model=model_label(cfg.student), **provenance)

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
        extra["teacher_fingerprint"] = fingerprint_record(teacher)
        if trainer.is_global_zero:  # each ensemble member, and the teacher on its own view (kd.teachers.views)
            metrics |= teacher_view_metrics(getattr(teacher, "teacher", teacher), data, module.device)
    results = {
        "metrics": metrics,
        **extra,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "train_images_per_s": round(throughput.images_per_s, 2),
        "world_size": trainer.world_size,
        "output_dir": str(out),
        "history": [{"epoch": 0, "step": 0, **before}, *history.records],  # validation after each epoch
    }
    if trainer.is_global_zero:
        export_student(student, card, out, ["safetensors"])  # student.safetensors + student.json
        write_results(out, cfg, task, **results)
        print_summary(task, metrics)
    return results
