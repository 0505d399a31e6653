"""The teacher of a run: its architecture and weights, frozen. A teacher must already predict the
dataset's classes: it never gets a new classifier."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.models import Classifier
from kd.teachers.frozen import FrozenTeacher
from kd.weights.sources import ObtainAuto, load_weights, resolve

log = logging.getLogger("kd")


def has_teacher(cfg: DictConfig) -> bool:
    """False when the run was told to go without one (``~teacher`` on the command line)."""
    return cfg.get("teacher") is not None and cfg.teacher.get("arch") is not None


def build_teacher_model(model_cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None) -> Classifier:
    """The teacher's network with its weights, not yet frozen (``model_cfg`` is ``cfg.teacher``)."""
    if model_cfg.get("zero_init_last_bn", False):
        raise KdError("teacher.zero_init_last_bn=true applies to a student trained from scratch only; remove it")
    arch = instantiate(model_cfg.arch)
    net = arch.build(num_classes)
    source = resolve(model_cfg.get("weights"))
    name = model_cfg.get("name", "model")
    preprocessing = load_weights(net, arch, model_cfg, "teacher", num_classes, obtain_auto)
    if source.kind == "none":
        log.warning(
            "teacher %s has no weights (teacher.weights=none): a random teacher has nothing to teach, "
            "which only makes sense for smoke tests and benchmarks",
            name,
        )
    return Classifier(net, preprocessing or arch.preprocessing())


def build_teacher(cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None) -> FrozenTeacher:
    """The run's frozen teacher (``cfg.teacher``, with ``bn_train_mode``, ``channels_last``, ``compile``)."""
    if not has_teacher(cfg):
        raise KdError("this task needs a teacher but ~teacher removed it; choose one with teacher=NAME")
    model = build_teacher_model(cfg.teacher, num_classes, obtain_auto)
    return FrozenTeacher(
        model,
        bn_train_mode=bool(cfg.teacher.get("bn_train_mode", False)),
        channels_last=bool(cfg.teacher.get("channels_last", True)),
        compile=bool(cfg.teacher.get("compile", False)),
    )
