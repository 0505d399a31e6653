from __future__ import annotations

from kd.losses.base import DistillationLoss
from kd.losses.labels import check_label_smoothing, label_cross_entropy


class LabelCrossEntropy(DistillationLoss):
    """Plain cross-entropy on the ground-truth labels (with optional label smoothing): the
    supervised baseline, and the loss of ``task=train``. It never needs the teacher.
    With mixup/cutmix the labels are the mixed ones."""

    uses_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def terms(self, student_logits, teacher_logits, target):
        return {"ce": label_cross_entropy(student_logits, target, self.label_smoothing)}
