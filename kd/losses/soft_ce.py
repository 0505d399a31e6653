from __future__ import annotations

import torch.nn.functional as F

from kd.losses.base import DistillationLoss
from kd.losses.standardize import check_standardization, maybe_standardize


class SoftTargetCrossEntropy(DistillationLoss):
    """Cross-entropy of the student against the teacher's softmax: no temperature, no label.

    The Baidu ResNet50_vd recipe. Equals KL(teacher || student) plus the teacher's entropy, which is
    constant for the student, so the gradients are those of KL. With ``logit_standardization`` both logits
    are z-scored per image first (``kd.losses.standardize``).
    """

    def __init__(self, logit_standardization: bool = False) -> None:
        super().__init__()
        self.logit_standardization = check_standardization(logit_standardization)

    def terms(self, student_logits, teacher_logits, target):
        student, teacher = maybe_standardize(self.logit_standardization, student_logits, teacher_logits)
        teacher_probs = F.softmax(teacher, dim=1)
        log_student = F.log_softmax(student, dim=1)
        return {"soft_ce": -(teacher_probs * log_student).sum(dim=1).mean()}
