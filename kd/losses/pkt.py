from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import UNBOUND, check_bound, full_precision, last_stage, pooled

EPS = 1e-7  # as RepDistiller's PKT: keeps the log finite where a conditional probability is 0


def cosine_conditionals(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N): ``P[i, j] = K(i, j) / sum_j K(i, j)`` with the cosine kernel ``K = (cos + 1) / 2``."""
    unit = F.normalize(features.float(), dim=1)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


class ProbabilisticKnowledgeTransfer(DistillationLoss):
    """PKT (Passalis & Tefas, ECCV 2018), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + weight * mean_{i,j} P_t[i,j] * log((P_t[i,j] + eps) / (P_s[i,j] + eps))``.

    ``P`` are the conditional probabilities of a cosine-similarity kernel over the batch, computed on each
    network's penultimate features (its last stage, global-average-pooled): a KL between how each image's
    neighbours are distributed for the teacher and for the student, averaged over all N*N pairs as
    RepDistiller does. Feature dimensions of the two networks need not match; a batch needs two images or more.
    """

    def __init__(self, weight: float = 30000.0, ce_weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight = check_weight("weight", weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.stages: FeatureStages | None = None

    def bind(self, student, teacher) -> None:
        if teacher is not None:
            s, t = last_stage(student, teacher, "pkt")
            self.stages = FeatureStages((s,), (t,))

    def feature_stages(self) -> FeatureStages:
        return self.stages or UNBOUND

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound("pkt", self.stages is not None)
        with full_precision(student_logits):
            p_s = cosine_conditionals(pooled(features.student[self.stages.student[0]]))
            p_t = cosine_conditionals(pooled(features.teacher[self.stages.teacher[0]]))
            kl = (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
        terms = {"pkt": self.weight * kl}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
