"""``task=distill`` (a frozen teacher teaches a pretrained student) and ``task=train`` (labels only)."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.data.unlabeled import check_labels_reach_loss, training_images
from kd.module import DistillationModule
from kd.results.best import best_record
from kd.results.callbacks import TrainThroughput, ValidationHistory
from kd.results.files import write_results
from kd.results.report import print_summary
from kd.students.card import CardInCheckpoint, card_for
from kd.students.ema import check_ema_decay
from kd.students.export import export_student
from kd.students.fast import check_compile, wants_channels_last
from kd.students.speed import student_speed
from kd.tasks.auto_weights import auto_weights
from kd.tasks.checks import check_before_work
from kd.tasks.common import (
    attach_loggers,
    build_data,
    build_models,
    build_trainer,
    optimizer_factory,
    output_dir,
    validate,
)
from kd.tasks.given import Given
from kd.teachers.ensemble import fingerprint_record
from kd.teachers.fill import teacher_for_run
from kd.teachers.precision import computed_precisions
from kd.teachers.views import teacher_view_metrics
from kd.training.resume import ResumePoint
from kd.weights.names import model_label

log = logging.getLogger("kd")


def distill(cfg: DictConfig) -> dict:
    return fit(cfg, task="distill")


def train(cfg: DictConfig) -> dict:
    return fit(cfg, task="train")


def fit(cfg: DictConfig, task: str, given: Given | None = None) -> dict:
    """The run of ``task=distill`` and ``task=train``; ``given`` parts (``kd.distill``) replace those of ``cfg``."""
    given = given or Given()
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # models with weights=none start from this seed
    out = output_dir(cfg)
    loss = given.loss if given.loss is not None else instantiate(cfg.loss)
    check_compile(bool(cfg.student.get("compile", False)), loss.feature_stages().student)  # before any work
    wants_channels_last(cfg.student.get("channels_last", "auto"), torch.nn.Module())  # refuses a bad value now
    ema_decay = check_ema_decay(cfg.student.get("ema_decay")) if cfg.student.get("ema", False) else None
    mixup = instantiate(cfg.mixup) if cfg.get("mixup") else None  # checks the batch size before any work
    optimizer = optimizer_factory(cfg)
    scheduler = instantiate(cfg.sched) if cfg.get("sched") else None
    data = given.data if given.data is not None else build_data(cfg, cfg.student)
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

    if given.student is not None:
        teacher, student = given.teacher, given.student
    else:
        teacher, student = build_models(cfg, data.num_classes, auto_weights(cfg, data), with_teacher=task == "distill")
    if teacher is not None:  # the frozen teacher, or its outputs stored in teacher.cache (filled here)
        teacher = teacher_for_run(cfg, teacher, loss, data, mixup, trainer)
    # Seeded before the module: losses build their trainable parts (feature adapters) in it.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillationModule(
        student,
        loss,
        optimizer,
        scheduler,
        data.num_classes,
        teacher,
        mixup,
        channels_last=cfg.student.get("channels_last", "auto"),
        compile=bool(cfg.student.get("compile", False)),
        ema_decay=ema_decay,
    )
    loss.bind_data(len(data.train_set))  # before the resume check compares loss.* shapes (CRD's memories)
    if resume is not None:
        resume.check(module, teacher and teacher.start_fingerprint, data.batch_size, trainer.world_size)
    provenance = {}
    if teacher is not None:  # the real teacher's name, not the option's (teacher=timm)
        provenance = {"teacher": model_label(cfg.teacher), "teacher_fingerprint": teacher.start_fingerprint}
    card = card_callback.card = card_for(student, data, model=model_label(cfg.student), **provenance)
    attach_loggers(cfg, trainer)  # every check has passed: only now do csv/ and wandb/ appear

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # training does not depend on what ran before
    before = validate(trainer, module, data)
    trainer.fit(module, datamodule=data, ckpt_path=resume and resume.path)
    after = validate(trainer, module, data)

    metrics = {
        **after,
        **{k.replace("student/", "student_init/"): v for k, v in before.items() if k.startswith("student/")},
    }
    history_records = [{"epoch": 0, "step": 0, **before}, *history.records]  # validation after each epoch
    extra = {"best": best} if (best := best_record(history_records)) else {}
    if ema_decay is not None:
        extra["ema_decay"] = ema_decay
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
        "precision": run_precisions(trainer, teacher),
        "train_images": training_images(data),
        "output_dir": str(out),
        "history": history_records,
    }
    if trainer.is_global_zero:
        export_student(student, card, out, ["safetensors"])  # student.safetensors + student.json
        if module.student_ema is not None:  # student_ema.safetensors + student_ema.json, loadable the same way
            export_student(module.student_ema.module, card, out, ["safetensors"], name="student_ema")
        if cfg.student.get("measure_speed", True):  # the deployed student's latency, FLOPs, parameters
            image_size = tuple(data.val_set[0][0].shape)
            results["student_speed"] = student_speed(student, image_size, trainer.strategy.root_device)
        write_results(out, cfg, task, **results)
        print_summary(task, metrics)
    return results


def run_precisions(trainer: L.Trainer, teacher) -> dict[str, str]:
    """What the run computed in: the student's Lightning precision and the teacher's (``teacher.precision``)."""
    device_type = trainer.strategy.root_device.type
    return {
        "student": str(trainer.precision),
        **({"teacher": "/".join(computed_precisions(teacher, device_type))} if teacher is not None else {}),
    }
