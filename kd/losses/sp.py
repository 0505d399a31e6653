from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd.losses.labels import check_weight
from kd.losses.stages import StagePairLoss


def similarity(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, N): the batch's Gram matrix of flattened features, each row scaled to unit L2 norm."""
    flat = feature_map.float().flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


class SimilarityPreserving(StagePairLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller runs it on CIFAR-100:
    ``ce_weight * CE + gamma * sum over stages of ||G_s - G_t||_F^2 / N^2``.

    ``G = row_normalize(Q Q^T)`` with ``Q`` the batch's feature maps flattened to (N, C*H*W): which images the
    network finds alike. It compares (N, N) matrices, so widths and sizes of the two networks need not match;
    it needs a batch of more than one image. Default stage: the last of each (RepDistiller's and mdistiller's
    choice); ``student_stages``/``teacher_stages`` list several, summed.
    """

    name = "sp"

    def __init__(
        self,
        gamma: float = 3000.0,
        student_stages: Sequence[int] | None = (-1,),
        teacher_stages: Sequence[int] | None = (-1,),
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        gamma = check_weight("gamma", gamma)  # the loss's own setting is checked first, then the label term's
        super().__init__(
            ce_weight, label_smoothing, student_stages, teacher_stages,
            student_layers=student_layers, teacher_layers=teacher_layers,
        )  # fmt: skip
        self.gamma = gamma

    def feature_terms(self, pairs):
        total = 0
        for student_map, teacher_map in pairs:
            difference = similarity(student_map) - similarity(teacher_map)
            total = total + difference.pow(2).sum() / difference.shape[0] ** 2
        return {"sp": self.gamma * total}
