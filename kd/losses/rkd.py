from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd.losses.labels import check_weight
from kd.losses.stages import StagePairLoss, pooled


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


class RelationalKD(StagePairLoss):
    """Relational KD (Park et al., CVPR 2019), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + distance_weight * L_d + angle_weight * L_a``, with
    ``L_d = smooth_l1(psi_D(s), psi_D(t))`` over all pairs and ``L_a = smooth_l1(psi_A(s), psi_A(t))`` over all
    triplets (Huber loss, delta 1, averaged).

    ``psi_D`` is the pairwise distance divided by the batch's mean distance, ``psi_A`` the cosine of the angle a
    triplet makes; both on each network's penultimate features (its last stage, global-average-pooled), so the
    two networks' feature dimensions need not match. A batch needs two images or more (three for angles).
    """

    name = "rkd"

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        # The loss's own settings are checked first, then the label term's.
        distance_weight = check_weight("distance_weight", distance_weight)
        angle_weight = check_weight("angle_weight", angle_weight)
        super().__init__(
            ce_weight, label_smoothing, last_stage_only=True, student_layers=student_layers,
            teacher_layers=teacher_layers,
        )  # fmt: skip
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def feature_terms(self, pairs):
        [(student_map, teacher_map)] = pairs
        student, teacher = pooled(student_map), pooled(teacher_map)
        distance = F.smooth_l1_loss(normalized_distances(student), normalized_distances(teacher))
        angle = F.smooth_l1_loss(angles(student), angles(teacher))
        return {"rkd_distance": self.distance_weight * distance, "rkd_angle": self.angle_weight * angle}
