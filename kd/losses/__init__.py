"""Losses: ``loss(student_logits, teacher_logits, target) -> scalar``, one small module per family."""

from kd.losses.base import DistillationLoss
from kd.losses.ce import LabelCrossEntropy
from kd.losses.kd import HintonKD
from kd.losses.soft_ce import SoftTargetCrossEntropy

__all__ = ["DistillationLoss", "HintonKD", "LabelCrossEntropy", "SoftTargetCrossEntropy"]
