from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_smoothing: float = 0.0):
    """Cross-entropy of the student against the teacher's top class (DeiT's hard distillation,
    ``F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))``), the target optionally smoothed."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=1), label_smoothing=label_smoothing)


class HardLabelKD(DistillationLoss):
    """Hard-label distillation (Touvron et al., DeiT, ICML 2021): ``CE(student, argmax teacher)`` on the view the
    student sees (the same crop and mixup), plus ``ce_weight`` times the label cross-entropy (0: off).

    The teacher's top class stands in for a label, so it trains on unlabeled images too; ``label_smoothing``
    smooths that target (DeiT's hard distillation uses none) and the label term alike.
    """

    def __init__(self, label_smoothing: float = 0.0, ce_weight: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.ce_weight = check_weight("ce_weight", ce_weight)

    def terms(self, student_logits, teacher_logits, target):
        terms = {"hard_kd": hard_distillation(student_logits, teacher_logits, self.label_smoothing)}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
