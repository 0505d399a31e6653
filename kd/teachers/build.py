"""The teacher of a run: its architecture and weights, frozen. A teacher must already predict the
dataset's classes: it never gets a new classifier."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kd.errors import KdError
from kd.models import Classifier
from kd.models.spec import EnsembleSpec, ModelSpec
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.precision import TeacherPrecision
from kd.weights.sources import load_weights, resolve

log = logging.getLogger("kd")


@dataclass(frozen=True)
class TeacherSettings:
    """How the frozen teacher runs: BatchNorm on batch statistics (as SSLD did), NHWC memory format,
    ``torch.compile``, the precision it computes in."""

    bn_train_mode: bool = False
    channels_last: bool = True
    compile: bool = False
    precision: TeacherPrecision = "auto"  # kd.teachers.precision: bf16 autocast where the hardware has it


def build_teacher_model(spec: ModelSpec | EnsembleSpec, num_classes: int) -> Classifier:
    """The teacher's network with its weights, not yet frozen."""
    if isinstance(spec, EnsembleSpec):
        raise KdError("teacher=ensemble builds one model per member; this task needs one model, give teacher=NAME")
    net = spec.arch.build(num_classes)
    preprocessing = load_weights(net, spec, "teacher", num_classes)
    if resolve(spec.weights).kind == "none":
        log.warning(
            "teacher %s has no weights (teacher.weights=none): a random teacher has nothing to teach, "
            "which only makes sense for smoke tests and benchmarks",
            spec.name or "model",
        )
    return Classifier(net, preprocessing or spec.arch.preprocessing())


def frozen(model: Classifier, settings: TeacherSettings, student_size: tuple[int, int] | None) -> FrozenTeacher:
    """``model`` frozen; it sees the student's view resized to its own size when the two sizes differ."""
    own = tuple(model.preprocessing.input_size[1:])
    return FrozenTeacher(
        model,
        bn_train_mode=settings.bn_train_mode,
        channels_last=settings.channels_last,
        compile=settings.compile,
        resize_to=own if student_size is not None and own != student_size else None,
        precision=settings.precision,
    )


def build_teacher(
    spec: ModelSpec | EnsembleSpec,
    num_classes: int,
    settings: TeacherSettings = TeacherSettings(),
    student_size: tuple[int, int] | None = None,
) -> FrozenTeacher | EnsembleTeacher:
    """The run's frozen teacher, or an ensemble of frozen members (``teacher=ensemble``); ``student_size`` is the
    student's own (height, width), which the data's view follows."""
    if not isinstance(spec, EnsembleSpec):
        return frozen(build_teacher_model(spec, num_classes), settings, student_size)
    members = [frozen(build_teacher_model(member, num_classes), settings, student_size) for member in spec.members]
    for member_spec, member in zip(spec.members, members, strict=True):
        log.info(
            "teacher member %s: fingerprint %s, input %s", member_spec.name, member.start_fingerprint[:12],
            "x".join(map(str, member.preprocessing.input_size)),
        )  # fmt: skip
    weights = list(spec.weights_per_member) if spec.weights_per_member is not None else None
    return EnsembleTeacher(members, [str(m.name) for m in spec.members], combine=spec.combine, weights=weights)
