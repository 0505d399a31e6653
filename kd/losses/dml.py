from __future__ import annotations

import torch.nn.functional as F

from kd.losses.base import DistillationLoss
from kd.losses.standardize import check_standardization, maybe_standardize


class SymmetricKL(DistillationLoss):
    """The symmetric KL of SSLD and PaddleClas's DMLLoss (which PaddleClas calls a JS divergence):
    ``(KL(p_s || p_t) + KL(p_t || p_s)) / 2`` on plain softmax outputs, no temperature, no label.

    Each KL is summed over classes and averaged over the batch. Log-probabilities come from
    ``log_softmax``, so the value stays exact (and finite) where a probability underflows to 0. With
    ``logit_standardization`` both logits are z-scored per image first (``kd.losses.standardize``).
    """

    def __init__(self, logit_standardization: bool = False) -> None:
        super().__init__()
        self.logit_standardization = check_standardization(logit_standardization)

    def terms(self, student_logits, teacher_logits, target):
        student, teacher = maybe_standardize(self.logit_standardization, student_logits, teacher_logits)
        log_student = F.log_softmax(student, dim=1)
        log_teacher = F.log_softmax(teacher, dim=1)
        teacher_to_student = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        student_to_teacher = F.kl_div(log_teacher, log_student, reduction="batchmean", log_target=True)
        return {"dml": (teacher_to_student + student_to_teacher) / 2}
