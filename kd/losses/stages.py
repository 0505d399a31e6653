"""Stage choice shared by the feature losses (at, sp, pkt, rkd, crd): which of timm's ``feature_info`` stages of the
student are compared with which of the teacher, checked against the models before any training; and
``StagePairLoss``, the frame of the losses that compare those feature maps pair by pair."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy


def stage_info(model, role: str, loss_name: str) -> list[dict]:
    info = model.feature_info()
    if not info:
        raise KdError(
            f"loss={loss_name} reads intermediate features, but the {role} network exposes none (it needs timm's "
            "feature_info and forward_intermediates, as timm models and kd's ConvNet and CIFAR ResNets have); "
            "choose another loss"
        )
    return info


def resolve(stages: Sequence[int], count: int, role: str, key: str) -> tuple[int, ...]:
    for stage in stages:
        if not isinstance(stage, int) or not -count <= stage < count:
            raise KdError(
                f"loss.{key}={list(stages)} has {stage!r}, out of range: the {role} has {count} stages (0 to "
                f"{count - 1}, or -1 for the last); choose among them"
            )
    return tuple(stage % count for stage in stages)


def stage_pairs(
    student, teacher, student_stages: Sequence[int] | None, teacher_stages: Sequence[int] | None, loss_name: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Matching student and teacher stages (non-negative indices). ``None`` for both: every stage but the first
    (the stem of ResNets), paired from the last backwards, as many as the shallower network has."""
    student_info = stage_info(student, "student", loss_name)
    teacher_info = stage_info(teacher, "teacher", loss_name)
    if student_stages is None and teacher_stages is None:
        pairs = max(1, min(len(student_info), len(teacher_info)) - 1)
        student_stages = list(range(-pairs, 0))
        teacher_stages = list(range(-pairs, 0))
    if student_stages is None or teacher_stages is None or len(student_stages) != len(teacher_stages):
        raise KdError(
            f"loss.student_stages={student_stages} and loss.teacher_stages={teacher_stages} must be lists of the same "
            "length (the i-th student stage is compared with the i-th teacher stage), or both null for the default"
        )
    if not student_stages:
        raise KdError(f"loss={loss_name} was given no stages; list at least one, or leave both null for the default")
    return (
        resolve(student_stages, len(student_info), "student", "student_stages"),
        resolve(teacher_stages, len(teacher_info), "teacher", "teacher_stages"),
    )


#: What a feature loss reports before ``bind`` has resolved its stages against the models: the last stage of
#: each, so callers (the preflight checks) already know that it reads features, as ``loss=fitnet`` reports.
UNBOUND = FeatureStages((-1,), (-1,))


def last_stage(student, teacher, loss_name: str) -> tuple[int, int]:
    """The last stage of each network: global-average-pooled, it is the penultimate (pre-classifier) feature."""
    return len(stage_info(student, "student", loss_name)) - 1, len(stage_info(teacher, "teacher", loss_name)) - 1


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) in float32: the global average pool that timm's and kd's heads apply before the
    classifier."""
    return feature_map.float().mean(dim=(2, 3))


def full_precision(like: torch.Tensor) -> torch.autocast:
    """A context with autocast off: the relation losses' Gram matrices, distances and exponentials stay in float32
    under ``trainer.precision=bf16-mixed`` / ``16-mixed``."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def check_bound(loss_name: str, bound: bool) -> None:
    if not bound:
        raise KdError(f"loss={loss_name} was used before bind(student, teacher) chose its stages; this is a bug in kd")


class StagePairLoss(DistillationLoss):
    """A loss on (student stage, teacher stage) feature maps plus the label cross-entropy (``ce_weight``, 0: off).

    What AT, SP, PKT, RKD and ReviewKD share: the stages are chosen in ``bind`` against the two models
    (``stage_pairs`` of the requested ones, or with ``last_stage_only`` the last stage of each), and the feature
    terms are computed in float32 under any autocast (``float32_terms``; a loss with trainable parts that should
    run under autocast turns it off). A subclass names itself (``name``, as in ``loss=NAME``) and implements
    ``feature_terms``.
    """

    name: str
    float32_terms = True

    def __init__(
        self,
        ce_weight: float,
        label_smoothing: float,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        last_stage_only: bool = False,
    ) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.requested = (student_stages, teacher_stages)
        self.last_stage_only = last_stage_only
        self.stages: FeatureStages | None = None

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return
        if self.last_stage_only:
            s, t = last_stage(student, teacher, self.name)
            self.stages = FeatureStages((s,), (t,))
        else:
            self.stages = FeatureStages(*stage_pairs(student, teacher, *self.requested, self.name))

    def feature_stages(self) -> FeatureStages:
        return self.stages or UNBOUND

    def feature_terms(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The weighted feature terms from the (student map, teacher map) of every chosen stage pair."""
        raise NotImplementedError

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound(self.name, self.stages is not None)
        stage_pairs_of_batch = zip(self.stages.student, self.stages.teacher, strict=True)
        pairs = [(features.student[s], features.teacher[t]) for s, t in stage_pairs_of_batch]
        with full_precision(student_logits) if self.float32_terms else nullcontext():
            terms = self.feature_terms(pairs)
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
