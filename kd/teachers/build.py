"""The teacher of a run: its architecture and weights, frozen. A teacher must already predict the
dataset's classes: it never gets a new classifier."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.models import Classifier
from kd.models.members import is_ensemble, member_configs
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.precision import teacher_precision
from kd.weights.sources import ObtainAuto, load_weights, resolve

log = logging.getLogger("kd")


def has_teacher(cfg: DictConfig) -> bool:
    """False when the run was told to go without one (``~teacher`` on the command line)."""
    return cfg.get("teacher") is not None and cfg.teacher.get("arch") is not None


def build_teacher_model(model_cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None) -> Classifier:
    """The teacher's network with its weights, not yet frozen (``model_cfg`` is ``cfg.teacher``)."""
    if is_ensemble(model_cfg):
        raise KdError("teacher=ensemble builds one model per member; this task needs one model, give teacher=NAME")
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


def student_input_size(cfg: DictConfig) -> tuple[int, int] | None:
    """The student's own (height, width), which the data's view follows; None without a student config."""
    student = cfg.get("student")
    if student is None or student.get("arch") is None or is_ensemble(student):
        return None
    return tuple(instantiate(student.arch).preprocessing().input_size[1:])


def frozen(model: Classifier, teacher_cfg: DictConfig, student_size: tuple[int, int] | None) -> FrozenTeacher:
    """``model`` frozen; it sees the student's view resized to its own size when the two sizes differ."""
    own = tuple(model.preprocessing.input_size[1:])
    return FrozenTeacher(
        model,
        bn_train_mode=bool(teacher_cfg.get("bn_train_mode", False)),
        channels_last=bool(teacher_cfg.get("channels_last", True)),
        compile=bool(teacher_cfg.get("compile", False)),
        resize_to=own if student_size is not None and own != student_size else None,
        precision=teacher_precision(teacher_cfg.get("precision", "auto")),
    )


def build_teacher(
    cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None
) -> FrozenTeacher | EnsembleTeacher:
    """The run's frozen teacher (``cfg.teacher``, with ``bn_train_mode``, ``channels_last``, ``compile``), or
    an ensemble of frozen members (``teacher=ensemble``)."""
    if not has_teacher(cfg):
        raise KdError("this task needs a teacher but ~teacher removed it; choose one with teacher=NAME")
    student_size = student_input_size(cfg)
    if not is_ensemble(cfg.teacher):
        return frozen(build_teacher_model(cfg.teacher, num_classes, obtain_auto), cfg.teacher, student_size)
    configs = member_configs(cfg.teacher)
    members = [frozen(build_teacher_model(c, num_classes, obtain_auto), cfg.teacher, student_size) for c in configs]
    for config, member in zip(configs, members, strict=True):
        log.info(
            "teacher member %s: fingerprint %s, input %s", config.name, member.start_fingerprint[:12],
            "x".join(map(str, member.preprocessing.input_size)),
        )  # fmt: skip
    weights = cfg.teacher.get("weights_per_member")
    return EnsembleTeacher(
        members,
        [str(c.name) for c in configs],
        combine=str(cfg.teacher.get("combine", "probs")),
        weights=list(weights) if weights is not None else None,
    )
