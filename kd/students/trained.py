"""The trained student that eval, predict and export work on: ``student.weights`` as they are, with its card."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kd.data import ClassificationData
from kd.errors import KdError
from kd.models import Classifier
from kd.models.spec import ModelSpec
from kd.students.build import build_student
from kd.students.card import StudentCard, card_for, read_card
from kd.weights.sources import is_local_file

log = logging.getLogger("kd")


def trained_student(
    spec: ModelSpec, data: ClassificationData | None, build_data: Callable[[], ClassificationData]
) -> tuple[Classifier, StudentCard]:
    """Build the student ``spec`` names from its weights (never with a new classifier) and find its card.

    The class names and preprocessing come from the card stored with the weights; the data (``data``,
    or ``build_data()`` when not built yet) is only needed when the weights carry no card.
    """
    weights = str(spec.weights)
    card = read_card(weights) if is_local_file(weights) else None
    if card is None:
        data = data or build_data()
    elif data is not None:
        check_same_classes(card, data, weights)
    class_names = card.class_names if card else data.class_names
    student = build_student(spec, len(class_names), new_head=False)
    if card is None:
        card = card_for(student, data, model=spec.name)
        log.info("student.weights=%s store no class names; using the %d classes of the data", weights, len(class_names))
    return Classifier(student.net, card.preprocessing), card


def check_same_classes(card: StudentCard, data: ClassificationData, weights: str) -> None:
    if card.num_classes != data.num_classes:
        raise KdError(
            f"student.weights={weights} predict {card.num_classes} classes but the data has {data.num_classes}; "
            "give the data the student was trained on"
        )
    if card.class_names != list(data.class_names):
        differ = [f"{a}/{b}" for a, b in zip(card.class_names, data.class_names, strict=True) if a != b][:3]
        log.warning(
            "student.weights=%s were trained with other class names than the data's (e.g. %s); "
            "metrics compare class indices",
            weights,
            ", ".join(differ),
        )
