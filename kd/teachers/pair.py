"""A teacher beside a student: two different networks that predict the same classes, the teacher frozen."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kd.errors import KdError
from kd.models import Classifier
from kd.models.wrap import as_classifier, output_classes
from kd.teachers.cache import CachedTeacher
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.frozen import FrozenTeacher


def check_same_classes(
    student_logits: torch.Tensor | tuple[torch.Tensor, ...], teacher_logits: torch.Tensor | None
) -> None:
    if isinstance(student_logits, tuple | list):  # a distilled student's (class head, distillation head)
        student_logits = student_logits[0]
    if teacher_logits is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise KdError(
            f"the teacher predicts {teacher_logits.shape[-1]} classes but the student {student_logits.shape[-1]}; "
            "give a teacher trained on the student's classes (kd never replaces a teacher's classifier)"
        )


def checked_models(
    student: Classifier | nn.Module,
    teacher: FrozenTeacher | CachedTeacher | nn.Module | None,
    num_classes: int | None,
    freeze: Callable[[Classifier], FrozenTeacher] = FrozenTeacher,
) -> tuple[Classifier, FrozenTeacher | CachedTeacher | None, int]:
    """Plain networks wrapped (the teacher frozen in place by ``freeze``), after checking that teacher and student
    are two different networks that predict the same classes; returns them with the class count."""
    student = as_classifier(student)
    if teacher is not None:
        shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
        if shared:
            raise KdError(
                f"the teacher and the student share {len(shared)} parameter tensors (the same network passed twice?), "
                "but the teacher is frozen and only the student trains; pass a copy as teacher (copy.deepcopy)"
            )
    if teacher is not None and not isinstance(teacher, FrozenTeacher | CachedTeacher | EnsembleTeacher):  # kd's own
        teacher = freeze(as_classifier(teacher))
    classes = output_classes(student)
    embedding = isinstance(teacher, FrozenTeacher) and teacher.embedding  # features, not classes
    teacher_classes = output_classes(teacher.model) if isinstance(teacher, FrozenTeacher) and not embedding else None
    if classes and teacher_classes and classes != teacher_classes:
        raise KdError(
            f"the teacher predicts {teacher_classes} classes but the student {classes}; "
            "give a teacher trained on the student's classes (kd never replaces a teacher's classifier)"
        )
    if num_classes is None:
        if classes is None:
            raise KdError(f"kd cannot tell how many classes {type(student.net).__name__} predicts; pass num_classes=")
        num_classes = classes
    elif classes and classes != num_classes:
        raise KdError(f"the student predicts {classes} classes but num_classes={num_classes}; make them agree")
    return student, teacher, num_classes
