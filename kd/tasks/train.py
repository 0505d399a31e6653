"""``task=distill`` (a frozen teacher teaches a pretrained student) and ``task=train`` (labels only)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kd.data import ClassificationData
from kd.data.augment import check_teacher_view
from kd.data.mixup import BatchMixup
from kd.data.unlabeled import check_labels_reach_loss, training_images
from kd.losses.base import DistillationLoss
from kd.models import Classifier
from kd.module import DistillationModule
from kd.results.best import best_record
from kd.results.callbacks import TrainThroughput, ValidationHistory
from kd.results.report import print_summary
from kd.students.card import CardInCheckpoint, StudentCard, card_for
from kd.students.ema import check_ema_decay
from kd.students.export import export_student
from kd.students.fast import FastPath
from kd.students.speed import student_speed
from kd.tasks.auto_weights import auto_weights
from kd.tasks.checks import check_before_work, check_model_keywords
from kd.tasks.common import (
    attach_loggers,
    build_data,
    build_models,
    build_trainer,
    optimizer_factory,
    output_dir,
    schedule_for,
    validate,
)
from kd.tasks.given import Given
from kd.tasks.models import cache_settings
from kd.tasks.records import model_records, write_results
from kd.teachers.ensemble import fingerprint_record
from kd.teachers.fill import teacher_for_run
from kd.teachers.guards import TeacherGuard
from kd.teachers.precision import computed_precisions
from kd.teachers.views import teacher_view_metrics
from kd.training.optim import OptimizerRecipe
from kd.training.preemption import StopOnRequeueSignal, preempted
from kd.training.resume import ResumePoint

log = logging.getLogger("kd")


def resume_command(out: Path) -> str:
    """This run's command line, pointed at its own folder (``ckpt_path=last`` is added by the caller)."""
    if not HydraConfig.initialized():
        return f"the same call with output_dir={out} and overrides=[...,"
    kept = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return " ".join(["python run.py", *kept, f"hydra.run.dir={out}"])


def distill(cfg: DictConfig) -> dict:
    return fit(cfg, task="distill")


def train(cfg: DictConfig) -> dict:
    return fit(cfg, task="train")


def fit(cfg: DictConfig, task: str, given: Given | None = None) -> dict:
    """The run of ``task=distill`` and ``task=train``, step by step; ``given`` parts (``kd.distill``) replace
    those of ``cfg``. Every check comes before the first step that works (training a model, filling a cache)."""
    given = given or Given()
    start = time.perf_counter()
    reseed(cfg)  # models with weights=none start from this seed
    run = prepare(cfg, task, given)  # loss, mixup, optimizer, schedule, data, trainer: each checked
    resume = ResumePoint.find(cfg.get("ckpt_path"), run.trainer)
    teacher, student = models_for(cfg, task, given, run)  # trains weights=auto models, fills teacher.cache
    module = distillation_module(cfg, run, student, teacher)
    if resume is not None:  # the teacher (its guard then skips this checkpoint), the student, the data position
        run.teacher_guard.check_resume(resume.checkpoint, resume.path, teacher)
        resume.check(module, run.data.batch_size, run.trainer.world_size)
    records = model_records(cfg, task)  # read once: the card, the dashboards' tags and results.json
    card = student_card(run, records, student, teacher)
    attach_loggers(cfg, run.trainer, records)  # every check has passed: only now do csv/ and wandb/ appear
    reseed(cfg)  # training does not depend on what ran before
    try:
        before = validate(run.trainer, module, run.data)
        run.trainer.fit(module, datamodule=run.data, ckpt_path=resume and resume.path)
        after = validate(run.trainer, module, run.data)
    except SIGTERMException:  # preempted: Lightning stopped after a whole step, Checkpoint wrote last.ckpt
        raise preempted(run.trainer, run.stopper, resume_command(run.out)) from None
    results = run_results(run, module, teacher, before, after, time.perf_counter() - start)
    if run.trainer.is_global_zero:
        save_student(cfg, run, module, card, results)
        write_results(run.out, cfg, task, records, **results)
        print_summary(task, results["metrics"])
    return results


@dataclass
class Run:
    """What a run trains with, built and checked before any model is."""

    out: Path
    loss: DistillationLoss
    fast: FastPath  # the student's channels_last and compile
    mixup: BatchMixup | None
    optimizer: OptimizerRecipe
    scheduler: object
    data: ClassificationData
    ema_decay: float | None
    trainer: L.Trainer
    throughput: TrainThroughput
    history: ValidationHistory
    card_callback: CardInCheckpoint
    stopper: StopOnRequeueSignal  # SLURM's SIGUSR1: stop at a step boundary, then requeue
    teacher_guard: TeacherGuard  # also checks a resumed checkpoint's teacher before any work


def reseed(cfg: DictConfig) -> None:
    """Each part that draws random numbers starts from the run's seed, whatever ran before it (a cached or a
    freshly trained ``weights=auto`` model, a filled or a reused cache)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def prepare(cfg: DictConfig, task: str, given: Given) -> Run:
    out = output_dir(cfg)
    loss = given.loss if given.loss is not None else instantiate(cfg.loss)
    check_model_keywords(cfg, loss, with_teacher=task == "distill")  # before any builder sees them
    student_stages = loss.feature_stages().student
    fast = FastPath.checked(cfg.student.get("channels_last", "auto"), cfg.student.get("compile", False), student_stages)
    ema_decay = check_ema_decay(cfg.student.get("ema_decay")) if cfg.student.get("ema", False) else None
    mixup = instantiate(cfg.mixup) if cfg.get("mixup") else None  # checks the batch size before any work
    teacher_view = check_teacher_view(str(OmegaConf.select(cfg, "teacher.view", default="consistent")))
    optimizer = optimizer_factory(cfg)
    scheduler = schedule_for(cfg)
    data = given.data if given.data is not None else build_data(cfg, cfg.student)
    if task == "train" and data.num_unlabeled:  # the honest baseline: labels only, no unlabeled image
        log.info("task=train trains on the %d labeled images alone, not on the %d unlabeled ones", data.num_labeled,
                 data.num_unlabeled)  # fmt: skip
        data = data.labeled_only()
    check_labels_reach_loss(data, loss)
    if task == "distill" and loss.uses_teacher and isinstance(data, ClassificationData):
        data.teacher_view = teacher_view  # the teacher's own images travel in the batches (kd.data.augment)
    throughput, history, card_callback = TrainThroughput(), ValidationHistory(), CardInCheckpoint(None)
    parts = (throughput, history, card_callback, StopOnRequeueSignal(), TeacherGuard())
    trainer = build_trainer(cfg, out, list(parts))
    check_before_work(cfg, data, loss, scheduler, trainer)
    return Run(out, loss, fast, mixup, optimizer, scheduler, data, ema_decay, trainer, *parts)


def models_for(cfg: DictConfig, task: str, given: Given, run: Run) -> tuple[object | None, Classifier]:
    """The teacher (the frozen one, or its outputs stored in ``teacher.cache``, filled here) and the student."""
    if given.student is not None:
        teacher, student = given.teacher, given.student
    else:
        obtain_auto = auto_weights(cfg, run.data)
        teacher, student = build_models(cfg, run.data.num_classes, obtain_auto, with_teacher=task == "distill")
    if teacher is not None:
        teacher = teacher_for_run(cache_settings(cfg), teacher, run.loss, run.data, run.mixup, run.trainer)
    return teacher, student


def distillation_module(cfg: DictConfig, run: Run, student: Classifier, teacher: object | None) -> DistillationModule:
    reseed(cfg)  # losses build their trainable parts (feature adapters) in the module
    module = DistillationModule(
        student,
        run.loss,
        run.optimizer,
        run.scheduler,
        run.data.num_classes,
        teacher,
        run.mixup,
        ema_decay=run.ema_decay,
        fast=run.fast,
    )
    module.bind_data(len(run.data.train_set))  # before the resume check compares loss.* shapes (CRD's memories)
    return module


def student_card(run: Run, records: dict, student: Classifier, teacher: object | None) -> StudentCard:
    """The card stored with the student's weights and in each checkpoint: classes, view, models by name."""
    provenance = {}
    if teacher is not None:  # the real teacher's name, not the option's (teacher=timm)
        provenance = {"teacher": label(records["teacher"]), "teacher_fingerprint": teacher.start_fingerprint}
    run.card_callback.card = card_for(student, run.data, model=label(records["student"]), **provenance)
    return run.card_callback.card


def run_results(run: Run, module: DistillationModule, teacher, before: dict, after: dict, seconds: float) -> dict:
    """results.json's body: final metrics beside the student's start, the best epoch, fingerprints, timings."""
    metrics = {
        **after,
        **{k.replace("student/", "student_init/"): v for k, v in before.items() if k.startswith("student/")},
    }
    history_records = [{"epoch": 0, "step": 0, **before}, *run.history.records]  # validation after each epoch
    extra = {"best": best} if (best := best_record(history_records)) else {}
    if run.ema_decay is not None:
        extra["ema_decay"] = run.ema_decay
    if teacher is not None:
        extra["teacher_fingerprint"] = fingerprint_record(teacher)
        if run.trainer.is_global_zero and not module.embedding_teacher:  # each member; the teacher on its own view
            metrics |= teacher_view_metrics(teacher.live, run.data, module.device)
    return {
        "metrics": metrics,
        **extra,
        "wall_time_s": round(seconds, 3),
        "train_images_per_s": round(run.throughput.images_per_s, 2),
        "world_size": run.trainer.world_size,
        "precision": run_precisions(run.trainer, teacher),
        "train_images": training_images(run.data),
        "output_dir": str(run.out),
        "history": history_records,
    }


def save_student(cfg: DictConfig, run: Run, module: DistillationModule, card: StudentCard, results: dict) -> None:
    """student.safetensors + student.json (and the EMA's), and the deployed student's speed in ``results``."""
    student = module.student
    export_student(student, card, run.out, ["safetensors"])
    if module.student_ema is not None:  # student_ema.safetensors + student_ema.json, loadable the same way
        export_student(module.student_ema.module, card, run.out, ["safetensors"], name="student_ema")
    if cfg.student.get("measure_speed", True):  # the deployed student's latency, FLOPs, parameters
        image_size = tuple(run.data.val_set[0][0].shape)
        results["student_speed"] = student_speed(student, image_size, run.trainer.strategy.root_device)


def label(record: dict | None) -> str | None:
    return record["name"] if record else None


def run_precisions(trainer: L.Trainer, teacher) -> dict[str, str]:
    """What the run computed in: the student's Lightning precision and the teacher's (``teacher.precision``)."""
    device_type = trainer.strategy.root_device.type
    return {
        "student": str(trainer.precision),
        **({"teacher": "/".join(computed_precisions(teacher, device_type))} if teacher is not None else {}),
    }
