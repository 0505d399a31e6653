from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.losses.dkd import warmup_weight
from kd.losses.fitnet import match_size
from kd.losses.labels import check_weight
from kd.losses.stages import StagePairLoss, channels

#: The pyramid of HCL: besides the full map, average pools to 4x4, 2x2 and 1x1 (each only when smaller than the map).
HCL_LEVELS = (4, 2, 1)


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """HCL of one pair of (N, C, H, W) maps of the same shape: the MSE of the full maps and of their average pools
    to 4x4, 2x2 and 1x1 (a level is skipped unless it is smaller than H), weighted 1, 1/2, 1/4, ... and divided by
    the sum of the weights used, so coarse context counts beside the exact positions."""
    total = F.mse_loss(student, teacher)
    weight, weights = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= student.shape[-2]:
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level)
        total = total + weight * F.mse_loss(*pooled)
        weights += weight
    return total / weights


class AttentionFusion(nn.Module):
    """ABF: one review level. A 1x1 convolution (+BN) brings the student's map to ``mid_channels``; unless this is
    the deepest level, it is fused with the deeper level's fused map (nearest-upsampled to this size) by two
    per-position weights a 1x1 convolution + sigmoid computes from both; a 3x3 convolution (+BN) then maps the fused
    map to the teacher's channels. Returns (output for HCL, fused map handed to the next shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.attention(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        return self.output(x), x


class ReviewKD(StagePairLoss):
    """Knowledge review (Chen et al., CVPR 2021), as mdistiller runs it on CIFAR-100:
    ``ce_weight * CE + w(epoch) * review_weight * sum over levels i of HCL(ABF_i(F_s^i, fused_{i+1}), F_t^i)``.

    Levels: the listed stage pairs, shallow to deep, and (``pooled``) a last one, the global average pool of the
    deepest listed stage of each, as the paper's 1x1 level. Review runs from the deepest level back: each level's
    student map is fused with the deeper levels' (``AttentionFusion``), so a shallow teacher stage is matched
    from deep and shallow student knowledge together. Where the output and the teacher's map differ in height and
    width, the larger is average-pooled to the smaller's size (as ``loss=fitnet``). ``w(epoch) =
    min((epoch + 1) / warmup_epochs, 1)`` (mdistiller's schedule; 0: none). The fusion modules belong to the loss:
    optimized with the student, checkpointed as ``loss.fusions.*``, never exported. The student's maps are taken
    after the activation (mdistiller's CIFAR default, ``STU_PREACT: False``).
    """

    name = "reviewkd"
    float32_terms = False  # the fusion modules train, under the run's autocast; HCL itself is taken in float32

    def __init__(
        self,
        review_weight: float = 1.0,
        warmup_epochs: int = 20,
        max_mid_channels: int = 512,
        pooled: bool = True,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise KdError(f"loss.warmup_epochs={warmup_epochs!r} must be a whole number >= 0 (0: no warmup)")
        if isinstance(max_mid_channels, bool) or not isinstance(max_mid_channels, int) or max_mid_channels < 1:
            raise KdError(f"loss.max_mid_channels={max_mid_channels!r} must be a whole number >= 1; ReviewKD uses 512")
        if not isinstance(pooled, bool):
            raise KdError(f"loss.pooled={pooled!r} must be true or false (true: add the 1x1 pooled level)")
        review_weight = check_weight("review_weight", review_weight)
        super().__init__(
            ce_weight, label_smoothing, student_stages, teacher_stages,
            student_layers=student_layers, teacher_layers=teacher_layers,
        )  # fmt: skip
        self.review_weight = review_weight
        self.warmup_epochs = warmup_epochs
        self.max_mid_channels = max_mid_channels
        self.pooled = pooled
        self.fusions: nn.ModuleList | None = None
        self.review_scale = warmup_weight(0, warmup_epochs)

    def bind(self, student, teacher) -> None:
        super().bind(student, teacher)
        if self.stages is None:
            return  # label-only tasks refuse this loss anyway (it uses the teacher)
        channels_in = channels(student, self.stages.student)
        channels_out = channels(teacher, self.stages.teacher)
        if self.pooled:
            channels_in.append(channels_in[-1])
            channels_out.append(channels_out[-1])
        mid = min(self.max_mid_channels, channels_in[-1])
        deepest = len(channels_in) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(c_in, mid, c_out, fuse=i < deepest)
            for i, (c_in, c_out) in enumerate(zip(channels_in, channels_out, strict=True))
        )

    def start_epoch(self, epoch: int) -> None:
        self.review_scale = warmup_weight(epoch, self.warmup_epochs)

    def levels(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The student's and the teacher's maps of every level, shallow to deep (the pooled one last)."""
        student = [student_map.float() for student_map, _ in pairs]
        teacher = [teacher_map.float() for _, teacher_map in pairs]
        if self.pooled:
            student.append(student[-1].mean(dim=(2, 3), keepdim=True))
            teacher.append(teacher[-1].mean(dim=(2, 3), keepdim=True))
        return student, teacher

    def feature_terms(self, pairs):
        student, teacher = self.levels(pairs)
        total = student[0].new_zeros((), dtype=torch.float32)
        deeper = None
        for i in reversed(range(len(student))):
            output, deeper = self.fusions[i](student[i], deeper)
            output, teacher_map = match_size(output.float(), teacher[i])
            total = total + hierarchical_context_loss(output, teacher_map)
        return {"reviewkd": self.review_scale * self.review_weight * total}
