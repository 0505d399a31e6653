from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import UNBOUND, check_bound, full_precision, stage_pairs


def similarity(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, N): the batch's Gram matrix of flattened features, each row scaled to unit L2 norm."""
    flat = feature_map.float().flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


class SimilarityPreserving(DistillationLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + gamma * sum over stages of ||G_s - G_t||_F^2 / N^2``.

    ``G = row_normalize(Q Q^T)`` with ``Q`` the batch's feature maps flattened to (N, C*H*W): which images the
    network finds alike. It compares (N, N) matrices, so widths and sizes of the two networks need not match;
    it needs a batch of more than one image. Default stage: the last of each (RepDistiller's and mdistiller's
    choice); ``student_stages``/``teacher_stages`` list several, summed.
    """

    def __init__(
        self,
        gamma: float = 3000.0,
        student_stages: Sequence[int] | None = (-1,),
        teacher_stages: Sequence[int] | None = (-1,),
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.gamma = check_weight("gamma", gamma)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.requested = (student_stages, teacher_stages)
        self.stages: FeatureStages | None = None

    def bind(self, student, teacher) -> None:
        if teacher is not None:
            self.stages = FeatureStages(*stage_pairs(student, teacher, *self.requested, "sp"))

    def feature_stages(self) -> FeatureStages:
        return self.stages or UNBOUND

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound("sp", self.stages is not None)
        total = student_logits.new_zeros((), dtype=torch.float32)
        with full_precision(student_logits):
            for s, t in zip(self.stages.student, self.stages.teacher, strict=True):
                difference = similarity(features.student[s]) - similarity(features.teacher[t])
                total = total + difference.pow(2).sum() / difference.shape[0] ** 2
        terms = {"sp": self.gamma * total}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
