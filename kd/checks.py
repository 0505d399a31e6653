"""Checks that run before any work (no model is built or trained yet): settings that make no sense together.

Each failure is a ``KdError``: one sentence naming the bad value and what to do instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from kd.data import ClassificationData
from kd.errors import KdError
from kd.losses.base import DistillationLoss

log = logging.getLogger("kd")


def planned_steps(trainer: L.Trainer, data: ClassificationData) -> tuple[int, int]:
    """(optimizer steps of the whole run, per epoch), counted as Lightning will count them once it runs."""
    per_process = data.samples_per_process(trainer.world_size)
    batch_size = data.batch_size
    batches = per_process // batch_size if per_process > batch_size else math.ceil(per_process / batch_size)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    by_epochs = per_epoch * max_epochs if max_epochs is not None and max_epochs >= 0 else None
    if max_steps is not None and max_steps >= 0:
        total = max_steps if by_epochs is None else min(max_steps, by_epochs)
    else:
        total = by_epochs if by_epochs is not None else per_epoch
    return total, per_epoch


def check_run_length(trainer: L.Trainer, data: ClassificationData, scheduler: Callable | None) -> None:
    total, per_epoch = planned_steps(trainer, data)
    if total < 1:
        raise KdError(
            f"this run would take no training step ({len(data.train_set)} training images, data.batch_size="
            f"{data.batch_size}, trainer.max_epochs={trainer.max_epochs}, trainer.max_steps={trainer.max_steps}); "
            "train for at least one step"
        )
    if scheduler is not None:  # the schedule checks itself (warmup longer than the run) on a stand-in optimizer
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler(probe, total_steps=total, steps_per_epoch=max(1, per_epoch))


def check_schedule_numbers(cfg: DictConfig) -> None:
    sched = cfg.get("sched") or {}
    warmup = sched.get("warmup_epochs", 0)
    if warmup is not None and warmup < 0:
        raise KdError(f"sched.warmup_epochs={warmup} is negative; use 0 for no warmup")
    min_lr = sched.get("min_lr", 0.0)
    if min_lr is not None and not 0 <= min_lr <= cfg.optim.lr:
        raise KdError(f"sched.min_lr={min_lr} must lie in [0, optim.lr={cfg.optim.lr}]; the cosine decays to it")


def check_loss_gives_gradient(loss: DistillationLoss, loss_cfg: DictConfig, num_classes: int) -> None:
    """A loss whose terms are all weighted zero is constant: the student would not learn. Probed on random logits."""
    stages = loss.feature_stages()
    if stages.student or stages.teacher:  # a feature loss needs the models' features (and bind), not logits alone
        return
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, num_classes, generator=generator, requires_grad=True)
    teacher = torch.randn(4, num_classes, generator=generator) if loss.uses_teacher else None
    target = torch.randint(0, num_classes, (4,), generator=generator)
    try:
        loss(student, teacher, target).backward()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:  # needs more than logits
        log.debug("loss gradient probe skipped: %s", error)
        return
    finally:
        loss.last_terms = {}
        loss.zero_grad(set_to_none=True)  # trainable loss parts (feature adapters) keep no probe gradient
    if student.grad is None or not bool(student.grad.abs().sum() > 0):
        zeros = [f"loss.{k}={v}" for k, v in loss_cfg.items() if isinstance(v, int | float) and v == 0]
        raise KdError(
            "the loss gives the student no gradient (its terms are all weighted zero: "
            f"{', '.join(zeros) or 'see loss.*'}); give at least one term a positive weight"
        )


def mixup_settings(cfg: DictConfig) -> DictConfig | None:
    """Where a mixup/cutmix config can live: ``mixup`` at the top or ``data.mixup``."""
    return OmegaConf.select(cfg, "mixup") or OmegaConf.select(cfg, "data.mixup")


def check_mixup_batch(cfg: DictConfig, batch_size: int) -> None:
    """timm's Mixup/CutMix pair each image with another of the same batch, so a batch must be even."""
    mixup = mixup_settings(cfg)
    if not mixup or mixup.get("enabled") is False:
        return
    active = any((mixup.get(key) or 0) > 0 for key in ("mixup_alpha", "cutmix_alpha", "alpha", "prob"))
    if active and batch_size % 2:
        raise KdError(f"data.batch_size={batch_size} is odd, but mixup pairs images within a batch; use an even batch")


def check_teacher_cache(cfg: DictConfig, loss: DistillationLoss | None) -> None:
    """``teacher.cache`` stores the teacher's logits per seeded training view; refuse what it cannot serve."""
    if not OmegaConf.select(cfg, "teacher.cache"):
        return
    if cfg.teacher.get("bn_train_mode"):
        raise KdError(
            "teacher.bn_train_mode=true makes each teacher output depend on the whole batch, so it cannot be "
            "stored per view; use teacher.cache=null or teacher.bn_train_mode=false"
        )
    if loss is not None and loss.uses_teacher and loss.feature_stages().teacher:
        raise KdError(
            f"loss {type(loss).__name__} compares the teacher's feature maps, but teacher.cache={cfg.teacher.cache} "
            "stores the teacher's logits only; use teacher.cache=null with feature losses"
        )
    if OmegaConf.select(cfg, "trainer.overfit_batches"):
        raise KdError(
            f"trainer.overfit_batches={cfg.trainer.overfit_batches} replaces the seeded training sampler, so the "
            "views cannot be looked up in teacher.cache; use teacher.cache=null to overfit a few batches"
        )


def check_distributed_launch(trainer: L.Trainer) -> None:
    """Lightning's ``ddp`` starts this script once more per extra process with this run's command line; a
    Hydra multirun would then start the whole sweep again in every process."""
    if trainer.world_size <= 1 or not HydraConfig.initialized():
        return
    relaunches = isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)
    external = trainer.strategy.cluster_environment.creates_processes_externally
    if HydraConfig.get().mode == RunMode.MULTIRUN and relaunches and not external:
        raise KdError(
            f"trainer.strategy=ddp with {trainer.world_size} processes cannot run inside a local multirun "
            "(each process would start the whole sweep); run the jobs one at a time, or sweep with "
            "hydra/launcher=slurm, where SLURM starts the processes"
        )


def check_before_work(
    cfg: DictConfig,
    data: ClassificationData,
    loss: DistillationLoss,
    scheduler: Callable | None,
    trainer: L.Trainer,
) -> None:
    check_schedule_numbers(cfg)
    check_loss_gives_gradient(loss, cfg.loss, data.num_classes)
    check_mixup_batch(cfg, data.batch_size)
    check_teacher_cache(cfg, loss)
    check_run_length(trainer, data, scheduler)
    check_distributed_launch(trainer)
