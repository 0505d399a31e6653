from __future__ import annotations

import torch.nn.functional as F

from kd.losses.base import DistillationLoss


class LabelCrossEntropy(DistillationLoss):
    """Plain cross-entropy on the ground-truth labels (with optional label smoothing): the
    supervised baseline, and the loss of ``task=train``. It never needs the teacher."""

    uses_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def terms(self, student_logits, teacher_logits, target):
        return {"ce": F.cross_entropy(student_logits.float(), target, label_smoothing=self.label_smoothing)}
