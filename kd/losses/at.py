from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.fitnet import match_size
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import UNBOUND, check_bound, full_precision, stage_pairs


def attention_map(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): the mean over channels of |F|^p, each image's map scaled to unit L2 norm."""
    a = feature_map.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


class AttentionTransfer(DistillationLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based, as mdistiller's AT runs it:
    ``ce_weight * CE + beta * sum over stages of mean((a_s - a_t)^2)``.

    ``a = normalize(mean_c |F|^p)`` per image (p = 2), the mean taken over the batch and the H*W positions.
    The maps have no channel axis, so the two networks' widths need not match; where their heights and widths
    differ, the larger feature map is average-pooled to the smaller's size first (as ``loss=fitnet``).
    Stages: ``student_stages[i]`` is compared with ``teacher_stages[i]``; both null: every stage but the stem.
    """

    def __init__(
        self,
        beta: float = 1000.0,
        p: float = 2.0,
        student_stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if p <= 0:
            raise KdError(f"loss.p={p} must be positive; attention transfer uses 2")
        self.beta = check_weight("beta", beta)
        self.p = p
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.requested = (student_stages, teacher_stages)
        self.stages: FeatureStages | None = None

    def bind(self, student, teacher) -> None:
        if teacher is not None:
            self.stages = FeatureStages(*stage_pairs(student, teacher, *self.requested, "at"))

    def feature_stages(self) -> FeatureStages:
        return self.stages or UNBOUND

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound("at", self.stages is not None)
        total = student_logits.new_zeros((), dtype=torch.float32)
        with full_precision(student_logits):
            for s, t in zip(self.stages.student, self.stages.teacher, strict=True):
                student_map, teacher_map = match_size(features.student[s], features.teacher[t])
                difference = attention_map(student_map, self.p) - attention_map(teacher_map, self.p)
                total = total + difference.pow(2).mean()
        terms = {"at": self.beta * total}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
