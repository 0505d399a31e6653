from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd.losses.labels import check_weight
from kd.losses.stages import StagePairLoss, pooled

EPS = 1e-7  # as RepDistiller's PKT: keeps the log finite where a conditional probability is 0


def cosine_conditionals(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N): ``P[i, j] = K(i, j) / sum_j K(i, j)`` with the cosine kernel ``K = (cos + 1) / 2``."""
    unit = F.normalize(features.float(), dim=1)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


class ProbabilisticKnowledgeTransfer(StagePairLoss):
    """PKT (Passalis & Tefas, ECCV 2018), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + weight * mean_{i,j} P_t[i,j] * log((P_t[i,j] + eps) / (P_s[i,j] + eps))``.

    ``P`` are the conditional probabilities of a cosine-similarity kernel over the batch, computed on each
    network's penultimate features (its last stage, global-average-pooled): a KL between how each image's
    neighbours are distributed for the teacher and for the student, averaged over all N*N pairs as
    RepDistiller does. Feature dimensions of the two networks need not match; a batch needs two images or more.
    """

    name = "pkt"

    def __init__(
        self,
        weight: float = 30000.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        weight = check_weight("weight", weight)  # the loss's own setting is checked first, then the label term's
        super().__init__(
            ce_weight, label_smoothing, last_stage_only=True, student_layers=student_layers,
            teacher_layers=teacher_layers,
        )  # fmt: skip
        self.weight = weight

    def feature_terms(self, pairs):
        [(student_map, teacher_map)] = pairs
        p_s = cosine_conditionals(pooled(student_map))
        p_t = cosine_conditionals(pooled(teacher_map))
        kl = (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
        return {"pkt": self.weight * kl}
