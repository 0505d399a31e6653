"""Checks that run before any work (no model is built or trained yet): settings that make no sense together.

Each failure is a ``KdError``: one sentence naming the bad value and what to do instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.data import ClassificationData
from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.models.arch import SET_BY_KD, reserved_keyword
from kd.tasks.models import cache_settings, is_ensemble, model_spec
from kd.teachers.ensemble import check_ensemble_loss
from kd.teachers.fill import check_teacher_cache
from kd.teachers.precision import resolve_precision
from kd.training.steps import planned_steps

log = logging.getLogger("kd")


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
        kd_log = logging.getLogger("kd")
        level = kd_log.level
        kd_log.setLevel(logging.WARNING)  # what the schedule adapts is logged once, when the module builds it
        try:
            scheduler(probe, total_steps=total, steps_per_epoch=max(1, per_epoch))
        finally:
            kd_log.setLevel(level)


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


def check_weights_given(cfg: DictConfig, loss: DistillationLoss) -> None:
    """A recipe that needs a trained model says ``weights: required`` and leaves the file to the user
    (experiment=cifar100_kd); ``???`` cannot say it, since a config merged over a set value keeps that value."""
    roles = ["student"] + (["teacher"] if loss.uses_teacher and cfg.get("teacher") is not None else [])
    for role in roles:
        if OmegaConf.is_missing(cfg[role], "weights") or cfg[role].get("weights") == "required":
            raise KdError(
                f"{role}.weights is not set, and this recipe needs the {role}'s trained weights: pass "
                f"{role}.weights=FILE (CRD's and mdistiller's ckpt_epoch_240.pth load as they are), or "
                f"{role}.weights=auto to train one here first"
            )


def bare_network(model_cfg: DictConfig | None, num_classes: int) -> nn.Module | None:
    """The network of ``model_cfg`` without its weights, on the meta device where it builds there (no memory, no
    values: names and shapes only); None for an ensemble or no model."""
    if model_cfg is None or model_cfg.get("arch") is None or is_ensemble(model_cfg):
        return None
    arch = instantiate(model_cfg.arch)
    try:
        with torch.device("meta"):
            return arch.build(num_classes)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a builder that reads values (.item())
        return arch.build(num_classes)


def check_loss_networks(cfg: DictConfig, loss: DistillationLoss, num_classes: int) -> None:
    """What a loss asks of the networks themselves (a distillation head, named layers), before any weights load."""
    if type(loss).check_networks is DistillationLoss.check_networks:
        return
    teacher = bare_network(cfg.get("teacher"), num_classes) if loss.uses_teacher else None
    loss.check_networks(bare_network(cfg.student, num_classes), teacher)


def loss_choice(cfg: DictConfig) -> str:
    """The loss as the command line named it (``kd``), else its class name."""
    hydra = cfg.get("hydra") or (HydraConfig.get() if HydraConfig.initialized() else None)
    choice = hydra.runtime.choices.get("loss") if hydra is not None else None
    return str(choice) if choice else cfg.loss._target_.rsplit(".", 1)[-1]


def check_embedding_teacher(cfg: DictConfig, loss: DistillationLoss) -> None:
    """A teacher built without a classifier (``teacher.arch.num_classes=0``) gives features: no logit loss, no cache."""
    teacher = cfg.get("teacher")
    arch = teacher.get("arch") if teacher is not None else None
    if not loss.uses_teacher or arch is None or is_ensemble(teacher) or arch.get("num_classes", None) != 0:
        return
    if loss.uses_teacher_logits:
        raise KdError(
            f"loss={loss_choice(cfg)} compares class predictions, but teacher.arch.num_classes=0 "
            "gives features only; use loss=feature_kd (or another feature loss), or give the teacher its classes"
        )
    if teacher.get("cache"):
        raise KdError(
            "teacher.cache stores a teacher's class scores, but teacher.arch.num_classes=0 gives features; "
            "leave teacher.cache=null"
        )


def check_model_keywords(cfg: DictConfig, loss: DistillationLoss, with_teacher: bool = True) -> None:
    """``+ROLE.arch.num_classes``, ``pretrained`` (and ``in_chans`` for torchvision): keywords kd passes to the
    model builder itself, refused in one sentence before the builder's traceback. ``num_classes=0`` asks a teacher
    for its features alone (an embedding teacher): ``check_embedding_teacher``."""
    for role in ("teacher", "student") if with_teacher else ("student",):
        arch = OmegaConf.select(cfg, f"{role}.arch")
        if not isinstance(arch, DictConfig):
            continue
        target = str(arch.get("_target_", ""))
        backends = {"TimmArch": "timm", "TorchvisionArch": "torchvision"}
        backend = backends.get(target.rpartition(".")[2])
        key = reserved_keyword(backend, arch) if backend else None
        if key is None:
            continue
        if role == "teacher" and key == "num_classes" and arch.num_classes == 0:
            continue  # an embedding teacher: check_embedding_teacher says which losses it can teach with
        reason = SET_BY_KD[key].replace("ROLE", role)
        raise KdError(f"{role}.arch.{key}={arch[key]} cannot be given to a {backend} model ({reason}); remove it")


def check_teacher_precision(cfg: DictConfig, loss: DistillationLoss, device_type: str) -> None:
    """teacher.precision is a known value, and 16 is not asked of a CPU (``kd.teachers.precision``)."""
    teacher = cfg.get("teacher")
    if teacher is not None and loss.uses_teacher and teacher.get("precision") is not None:
        resolve_precision(teacher.precision, device_type)


def cache_refusals(cfg: DictConfig) -> dict:
    """The settings ``teacher.cache`` cannot serve (``kd.teachers.fill.check_teacher_cache``)."""
    return {
        "bn_train_mode": bool(OmegaConf.select(cfg, "teacher.bn_train_mode") or False),
        "overfit_batches": OmegaConf.select(cfg, "trainer.overfit_batches") or 0,
    }


def check_ensemble(cfg: DictConfig, loss: DistillationLoss) -> None:
    """``teacher=ensemble``: every member exists (timm and torchvision names included) and the loss needs no
    feature maps."""
    if is_ensemble(cfg.get("teacher")):
        model_spec(cfg.teacher, "teacher")
        check_ensemble_loss(loss)


def check_before_work(
    cfg: DictConfig,
    data: ClassificationData,
    loss: DistillationLoss,
    scheduler: Callable | None,
    trainer: L.Trainer,
) -> None:
    check_schedule_numbers(cfg)
    check_weights_given(cfg, loss)
    check_loss_gives_gradient(loss, cfg.loss, data.num_classes)
    check_embedding_teacher(cfg, loss)
    check_loss_networks(cfg, loss, data.num_classes)

    check_teacher_precision(cfg, loss, trainer.strategy.root_device.type)
    check_teacher_cache(cache_settings(cfg), loss, **cache_refusals(cfg))  # the cache's own refusals (kd.teachers.fill)
    check_ensemble(cfg, loss)
    check_run_length(trainer, data, scheduler)
    check_distributed_launch(trainer)
