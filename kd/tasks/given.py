"""What a caller of ``kd.tasks.train.fit`` built itself instead of from the config (``kd.distill``)."""

from __future__ import annotations

from dataclasses import dataclass

from kd.data import ClassificationData
from kd.losses.base import DistillationLoss
from kd.models import Classifier
from kd.teachers.frozen import FrozenTeacher


@dataclass(frozen=True)
class Given:
    """Parts of a run handed in ready-made; a part left None is built from the config as ``python run.py`` does.
    ``student`` and ``teacher`` come together: both given, or both built (``teacher`` None in ``task=train``)."""

    data: ClassificationData | None = None
    student: Classifier | None = None
    teacher: FrozenTeacher | None = None
    loss: DistillationLoss | None = None
