from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import UNBOUND, check_bound, full_precision, last_stage, pooled


def normalized_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances between the batch's embeddings, divided by their mean over the pairs
    of distinct images (the diagonal is 0 and left out of the mean)."""
    squared = embeddings.pow(2).sum(dim=1)
    gram = embeddings @ embeddings.T
    distances = (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=1e-12).sqrt()
    distances = distances * (1 - torch.eye(len(embeddings), device=embeddings.device))
    positive = distances[distances > 0]
    return distances / positive.mean().clamp(min=1e-12)


def angles(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N, N): ``cos`` of the angle at vertex j of every triplet (i, j, k), i.e. the dot product of
    the unit vectors from e_j to e_i and from e_j to e_k."""
    unit = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], dim=2)  # [j, i] = e_i - e_j, unit length
    return unit @ unit.transpose(1, 2)


class RelationalKD(DistillationLoss):
    """Relational KD (Park et al., CVPR 2019), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + distance_weight * L_d + angle_weight * L_a``, with
    ``L_d = smooth_l1(psi_D(s), psi_D(t))`` over all pairs and ``L_a = smooth_l1(psi_A(s), psi_A(t))`` over all
    triplets (Huber loss, delta 1, averaged).

    ``psi_D`` is the pairwise distance divided by the batch's mean distance, ``psi_A`` the cosine of the angle a
    triplet makes; both on each network's penultimate features (its last stage, global-average-pooled), so the
    two networks' feature dimensions need not match. A batch needs two images or more (three for angles).
    """

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.stages: FeatureStages | None = None

    def bind(self, student, teacher) -> None:
        if teacher is not None:
            s, t = last_stage(student, teacher, "rkd")
            self.stages = FeatureStages((s,), (t,))

    def feature_stages(self) -> FeatureStages:
        return self.stages or UNBOUND

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound("rkd", self.stages is not None)
        with full_precision(student_logits):
            student = pooled(features.student[self.stages.student[0]])
            teacher = pooled(features.teacher[self.stages.teacher[0]])
            distance = F.smooth_l1_loss(normalized_distances(student), normalized_distances(teacher))
            angle = F.smooth_l1_loss(angles(student), angles(teacher))
        terms = {"rkd_distance": self.distance_weight * distance, "rkd_angle": self.angle_weight * angle}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
