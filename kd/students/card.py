"""A student's card: what its weights alone do not say (class names and input preprocessing).

Every training run stores the card with the student it writes (inside Lightning checkpoints, in the
metadata of ``.safetensors`` files and as a JSON file beside them), so eval, predict and export know the
classes and the view a student was trained with without the dataset at hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L

from kd.data import ClassificationData
from kd.models import Classifier, Preprocessing
from kd.weights.files import CHECKPOINT_KEY, read_stored_card

log = logging.getLogger("kd")

INPUT_NOTE = (
    "float32 NCHW images with pixel values in [0, 1]: resize the short side to input_size / crop_pct with "
    "`interpolation`, center-crop input_size; the ONNX and TorchScript models subtract mean and divide by std "
    "themselves, the .safetensors weights are the bare network, which expects normalized images"
)


@dataclass(frozen=True)
class StudentCard:
    class_names: list[str]
    preprocessing: Preprocessing
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, e.g. the teacher it was distilled from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        pre = self.preprocessing
        return {
            "model": self.model,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_size": list(pre.input_size),
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "input": INPUT_NOTE,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, card: dict[str, Any]) -> StudentCard:
        known = {"model", "num_classes", "class_names", "input_size", "mean", "std", "interpolation", "crop_pct"}
        preprocessing = Preprocessing(
            mean=tuple(card["mean"]),
            std=tuple(card["std"]),
            input_size=tuple(card["input_size"]),
            interpolation=card["interpolation"],
            crop_pct=card["crop_pct"],
        )
        extra = {k: v for k, v in card.items() if k not in known and k != "input"}
        return cls([str(name) for name in card["class_names"]], preprocessing, card.get("model"), extra)


def card_for(student: Classifier, data: ClassificationData, model: str | None = None, **extra: Any) -> StudentCard:
    """The card of a student trained on ``data``: its classes, its normalization and the view the data gave it."""
    return StudentCard(list(data.class_names), data_view(student.preprocessing, data), model, extra)


def data_view(preprocessing: Preprocessing, data: ClassificationData) -> Preprocessing:
    """The student's normalization with the image size, resize and crop its validation images really had.

    Data modules that resize (ImageFolder) say how; the others (digits, CIFAR) hand over images as they
    are, which a resize to their own size with crop_pct 1 reproduces.
    """
    image, _ = data.val_set[0]
    size = tuple(int(n) for n in image.shape[-2:])
    return replace(
        preprocessing,
        input_size=(preprocessing.in_chans, *size),
        interpolation=getattr(data, "interpolation", None) or preprocessing.interpolation,
        crop_pct=getattr(data, "crop_pct", None) or 1.0,
    )


def read_card(weights: str | Path) -> StudentCard | None:
    """The card stored with a weights file: in a Lightning checkpoint, a .safetensors header or ``<stem>.json``."""
    card = read_stored_card(weights)
    return StudentCard.from_dict(card) if card else None


class CardInCheckpoint(L.Callback):
    """Writes the student's card into every Lightning checkpoint of the run (set ``card`` before fitting)."""

    def __init__(self, card: StudentCard | None) -> None:
        self.card = card

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.card.to_dict()
