"""The run's models, read from its config once: each ``conf/model`` entry becomes a ``ModelSpec`` (its ``arch``
instantiated), ``teacher=ensemble``'s members are read from their own entries, and the teacher's settings and
cache become typed objects. Below ``kd.tasks`` nothing reads the config: ``kd.teachers`` and ``kd.students``
build the networks from these.

The ``build_*`` functions here are the config-level entry points the tasks (and tests) call with a config.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from kd.errors import KdError
from kd.io import CONF_DIR
from kd.models import Classifier
from kd.models.arch import closest
from kd.models.members import BACKENDS, COMBINE, zoo_names
from kd.models.spec import EnsembleSpec, ModelSpec
from kd.students import build as students
from kd.teachers import build as teachers
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.fill import CacheSettings
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.precision import teacher_precision
from kd.training.precision import device_type_of, trainer_precision

# ``weights: auto``: called with the model's config and role, trains it once (or finds it cached), gives the file
# (``kd.tasks.auto_weights.AutoWeights``).
ObtainAuto = Callable[[DictConfig, str], Path]


def is_ensemble(model_cfg: DictConfig | None) -> bool:
    return model_cfg is not None and model_cfg.get("members") is not None


def has_teacher(cfg: DictConfig) -> bool:
    """False when the run was told to go without one (``~teacher`` on the command line)."""
    return cfg.get("teacher") is not None and cfg.teacher.get("arch") is not None


def member_config(spec: str) -> DictConfig:
    """The model config one member name stands for."""
    backend, sep, name = spec.partition(":")
    if sep and backend in BACKENDS and name:
        node = OmegaConf.load(CONF_DIR / "any_model" / f"{backend}.yaml")
        node.model = name
    elif not sep and (CONF_DIR / "model" / f"{spec}.yaml").is_file():
        node = OmegaConf.load(CONF_DIR / "model" / f"{spec}.yaml")
    else:
        raise KdError(
            f"teacher.members has '{spec}', which is no zoo model (did you mean {closest(spec, zoo_names())}?); "
            "write a zoo name, timm:NAME or torchvision:NAME"
        )
    node.name = spec
    return node


def member_configs(teacher_cfg: DictConfig) -> list[DictConfig]:
    """One model config per member, with its ``member_overrides`` merged in; the ensemble's settings checked."""
    members = teacher_cfg.members
    if not isinstance(members, ListConfig | list) or len(members) < 2:
        raise KdError(
            f"teacher.members={members} must list at least two models, e.g. teacher.members=[resnet50_vd,timm:"
            "convnext_tiny]; for one teacher use teacher=NAME"
        )
    overrides = teacher_cfg.get("member_overrides") or {}
    unknown = [key for key in overrides if not str(key).isdigit() or int(key) >= len(members)]
    if unknown:
        raise KdError(
            f"teacher.member_overrides.{unknown[0]} names no member (there are {len(members)}, numbered from 0); "
            "use teacher.member_overrides.<index>.KEY=VALUE"
        )
    configs = []
    for index, spec in enumerate(members):
        node = member_config(str(spec))
        override = overrides.get(str(index), overrides.get(index)) if overrides else None
        configs.append(OmegaConf.merge(node, override) if override else node)
    combine = teacher_cfg.get("combine", "probs")
    if combine not in COMBINE:
        raise KdError(f"teacher.combine={combine} is unknown; use probs (mean of probabilities) or logits")
    weights = teacher_cfg.get("weights_per_member")
    numbers = weights is None or all(isinstance(w, int | float) and w >= 0 for w in weights)
    if weights is not None and (len(weights) != len(members) or not numbers or sum(weights) <= 0):
        raise KdError(
            f"teacher.weights_per_member={list(weights)} must give {len(members)} non-negative numbers, not all "
            "zero (one per member), or null for equal weights"
        )
    return configs


def model_spec(model_cfg: DictConfig, role: str, obtain_auto: ObtainAuto | None = None) -> ModelSpec | EnsembleSpec:
    """The objects a model entry stands for; an unknown timm or torchvision name is refused here, in one line."""
    if is_ensemble(model_cfg):
        members = tuple(model_spec(config, role, obtain_auto) for config in member_configs(model_cfg))
        weights = model_cfg.get("weights_per_member")
        return EnsembleSpec(
            members,
            combine=str(model_cfg.get("combine", "probs")),
            weights_per_member=tuple(float(w) for w in weights) if weights is not None else None,
        )
    weights = None if OmegaConf.is_missing(model_cfg, "weights") else model_cfg.get("weights")
    return ModelSpec(
        instantiate(model_cfg.arch),
        name=model_cfg.get("name"),
        weights=None if weights is None else str(weights),
        obtain_auto=partial(obtain_auto, model_cfg, role) if obtain_auto is not None else None,
    )


def teacher_settings(teacher_cfg: DictConfig) -> teachers.TeacherSettings:
    return teachers.TeacherSettings(
        bn_train_mode=bool(teacher_cfg.get("bn_train_mode", False)),
        channels_last=bool(teacher_cfg.get("channels_last", True)),
        compile=bool(teacher_cfg.get("compile", False)),
        precision=teacher_precision(teacher_cfg.get("precision", "auto")),
    )


def cache_settings(cfg: DictConfig) -> CacheSettings | None:
    """``teacher.cache`` of the run, or None without one."""
    teacher_cfg = cfg.get("teacher")
    if teacher_cfg is None or not teacher_cfg.get("cache"):
        return None
    accelerator = cfg.trainer.get("accelerator", "auto")
    return CacheSettings(
        folder=str(teacher_cfg.cache),
        topk=teacher_cfg.get("cache_topk", "auto"),
        seed=int(cfg.seed),
        accelerator=str(accelerator),
        # trainer.precision=auto resolved as the run's trainer resolves it (kd.tasks.common.run_precision)
        precision=str(trainer_precision(cfg.trainer.get("precision", "auto"), device_type_of(accelerator))),
        teacher_name=teacher_cfg.get("name"),
        teacher_arch=OmegaConf.to_container(teacher_cfg.arch, resolve=True),
        data_config=OmegaConf.to_container(cfg.data, resolve=True),
    )


def student_input_size(cfg: DictConfig) -> tuple[int, int] | None:
    """The student's own (height, width), which the data's view follows; None without a student config."""
    student = cfg.get("student")
    if student is None or student.get("arch") is None or is_ensemble(student):
        return None
    return tuple(instantiate(student.arch).preprocessing().input_size[1:])


def build_teacher(
    cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None
) -> FrozenTeacher | EnsembleTeacher:
    """The run's frozen teacher (``cfg.teacher``, with ``bn_train_mode``, ``channels_last``, ``compile``), or
    an ensemble of frozen members (``teacher=ensemble``)."""
    if not has_teacher(cfg):
        raise KdError("this task needs a teacher but ~teacher removed it; choose one with teacher=NAME")
    check_teacher_entry(cfg.teacher)
    spec = model_spec(cfg.teacher, "teacher", obtain_auto)
    return teachers.build_teacher(spec, num_classes, teacher_settings(cfg.teacher), student_input_size(cfg))


def check_teacher_entry(teacher_cfg: DictConfig) -> None:
    if teacher_cfg.get("zero_init_last_bn", False):
        raise KdError("teacher.zero_init_last_bn=true applies to a student trained from scratch only; remove it")


def build_teacher_model(model_cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None) -> Classifier:
    """The teacher's network with its weights, not yet frozen (``model_cfg`` is ``cfg.teacher``)."""
    if is_ensemble(model_cfg):
        raise KdError("teacher=ensemble builds one model per member; this task needs one model, give teacher=NAME")
    check_teacher_entry(model_cfg)
    return teachers.build_teacher_model(model_spec(model_cfg, "teacher", obtain_auto), num_classes)


def build_student(
    model_cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None = None, new_head: bool = True
) -> Classifier:
    """``model_cfg`` is a ``conf/model`` entry (``cfg.student``); ``obtain_auto`` trains ``weights: auto``."""
    if is_ensemble(model_cfg):
        raise KdError("student=ensemble is for teachers only; give the student one model, student=NAME")
    spec = model_spec(model_cfg, "student", obtain_auto)
    return students.build_student(spec, num_classes, new_head, bool(model_cfg.get("zero_init_last_bn", False)))
