from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.fitnet import match_size
from kd.losses.labels import check_weight
from kd.losses.stages import StagePairLoss


def attention_map(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): the mean over channels of |F|^p, each image's map scaled to unit L2 norm."""
    a = feature_map.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


class AttentionTransfer(StagePairLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based, as mdistiller's AT runs it:
    ``ce_weight * CE + beta * sum over stages of mean((a_s - a_t)^2)``.

    ``a = normalize(mean_c |F|^p)`` per image (p = 2), the mean taken over the batch and the H*W positions.
    The maps have no channel axis, so the two networks' widths need not match; where their heights and widths
    differ, the larger feature map is average-pooled to the smaller's size first (as ``loss=fitnet``).
    Stages: ``student_stages[i]`` is compared with ``teacher_stages[i]``; both null: every stage but the stem.
    """

    name = "at"

    def __init__(
        self,
        beta: float = 1000.0,
        p: float = 2.0,
        student_stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        if p <= 0:  # the loss's own settings are checked first, then the label term's
            raise KdError(f"loss.p={p} must be positive; attention transfer uses 2")
        beta = check_weight("beta", beta)
        super().__init__(
            ce_weight, label_smoothing, student_stages, teacher_stages,
            student_layers=student_layers, teacher_layers=teacher_layers,
        )  # fmt: skip
        self.beta = beta
        self.p = p

    def feature_terms(self, pairs):
        total = 0
        for student_map, teacher_map in pairs:
            student_map, teacher_map = match_size(student_map, teacher_map)
            difference = attention_map(student_map, self.p) - attention_map(teacher_map, self.p)
            total = total + difference.pow(2).mean()
        return {"at": self.beta * total}
