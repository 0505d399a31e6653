from __future__ import annotations

import torch.nn.functional as F

from kd.losses.base import DistillationLoss


class SoftTargetCrossEntropy(DistillationLoss):
    """Cross-entropy of the student against the teacher's softmax: no temperature, no label.

    The Baidu ResNet50_vd recipe. Equals KL(teacher || student) plus the teacher's entropy, which is
    constant for the student, so the gradients are those of KL.
    """

    def terms(self, student_logits, teacher_logits, target):
        teacher_probs = F.softmax(teacher_logits.float(), dim=1)
        log_student = F.log_softmax(student_logits.float(), dim=1)
        return {"soft_ce": -(teacher_probs * log_student).sum(dim=1).mean()}
