from __future__ import annotations

import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.losses.labels import check_label_smoothing, label_cross_entropy
from kd.losses.standardize import check_standardization, maybe_standardize


class HintonKD(DistillationLoss):
    """Hinton et al. 2015: ``alpha * CE(student, label) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)``.

    ``p^T`` is the softmax at temperature T; KL is summed over classes and averaged over the batch.
    The T^2 factor keeps the soft-target gradients at the same scale whatever T is. With
    ``logit_standardization`` both logits are z-scored per image first (``kd.losses.standardize``); the label
    term always sees the raw logits.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.0,
        label_smoothing: float = 0.0,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdError(f"loss.temperature={temperature} must be positive; 4 is the usual choice")
        if not 0.0 <= alpha <= 1.0:
            raise KdError(f"loss.alpha={alpha} must lie in [0, 1]; it weights the label term")
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.logit_standardization = check_standardization(logit_standardization)

    def terms(self, student_logits, teacher_logits, target):
        t = self.temperature
        student, teacher = maybe_standardize(self.logit_standardization, student_logits, teacher_logits)
        log_student = F.log_softmax(student / t, dim=1)
        log_teacher = F.log_softmax(teacher / t, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        terms = {"kd": (1.0 - self.alpha) * t * t * kl}
        if self.alpha > 0:
            terms["ce"] = self.alpha * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
