"""DeiT's token distillation (Touvron et al., ICML 2021): a student with two heads, one per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.losses.hard_kd import hard_distillation
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy

DISTILL_TYPES = ("hard", "soft")
#: timm families whose models take ``set_distilled_training`` (a distillation token or head).
DISTILLED_MODELS = "deit*_distilled, levit, pit*_distilled, efficientformer, efficientformerv2, repvit, swiftformer"


def token_distillation(
    distillation_logits: torch.Tensor, teacher_logits: torch.Tensor, distill_type: str, temperature: float
) -> torch.Tensor:
    """The distillation head's term, as timm's ``TokenDistillationTask`` computes it: CE against the teacher's top
    class (hard), or KL(p_t^T || p_s^T) averaged over the batch times T^2 (soft; DeiT's own code divides the summed
    KL by N * C instead, i.e. it is C times smaller)."""
    if distill_type == "hard":
        return hard_distillation(distillation_logits, teacher_logits)
    log_student = F.log_softmax(distillation_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class DeiTDistillation(DistillationLoss):
    """``class_weight * CE(class head, label) + distill_weight * D(distillation head, teacher)``.

    The student is a timm model with ``set_distilled_training``: in training it returns its two heads as
    ``(class_logits, distillation_logits)``, which this loss takes in place of ``student_logits``; in eval mode (and
    exported, and in ``task=predict``) it returns their average, as timm does. ``bind`` switches the student's
    distilled training on. The class term is a label term: unlabeled images are masked (``kd.losses.labels``).
    """

    def __init__(
        self,
        distill_type: str = "hard",
        temperature: float = 1.0,
        class_weight: float = 0.5,
        distill_weight: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if distill_type not in DISTILL_TYPES:
            raise KdError(f"loss.distill_type={distill_type} is unknown; use hard (DeiT's best) or soft")
        if not isinstance(temperature, int | float) or temperature <= 0:
            raise KdError(f"loss.temperature={temperature} must be positive; it softens both heads' softmax (soft)")
        self.distill_type = distill_type
        self.temperature = float(temperature)
        self.class_weight = check_weight("class_weight", class_weight)
        self.distill_weight = check_weight("distill_weight", distill_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def check_networks(self, student, teacher) -> None:
        net = getattr(student, "net", student)
        if not callable(getattr(net, "set_distilled_training", None)):
            raise KdError(
                f"loss=deit trains a student with a distillation head, which {type(net).__name__} lacks; choose a "
                f"timm model with set_distilled_training ({DISTILLED_MODELS})"
            )

    def bind(self, student, teacher) -> None:
        self.check_networks(student, teacher)
        getattr(student, "net", student).set_distilled_training(True)

    def terms(self, student_logits, teacher_logits, target):
        if not isinstance(student_logits, tuple | list) or len(student_logits) != 2:
            raise TypeError("loss=deit takes the student's two heads (class_logits, distillation_logits)")
        class_logits, distillation_logits = student_logits
        distill = token_distillation(distillation_logits, teacher_logits, self.distill_type, self.temperature)
        return {
            "ce": self.class_weight * label_cross_entropy(class_logits, target, self.label_smoothing),
            "distill": self.distill_weight * distill,
        }
