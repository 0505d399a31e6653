from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kd.models import Classifier


def stage_order(key: int | str) -> tuple[bool, int, str]:
    """Stage indices first, in order, then module names."""
    return (isinstance(key, str), key if isinstance(key, int) else 0, str(key))


@dataclass(frozen=True)
class FeatureStages:
    """Which intermediate feature maps a loss reads, of the student and of the teacher: stage indices (timm's
    ``feature_info`` numbering; negative counts from the last stage) or module names (``named_modules()``)."""

    student: tuple[int | str, ...] = ()
    teacher: tuple[int | str, ...] = ()

    def __or__(self, other: FeatureStages) -> FeatureStages:
        return FeatureStages(
            tuple(sorted(set(self.student) | set(other.student), key=stage_order)),
            tuple(sorted(set(self.teacher) | set(other.teacher), key=stage_order)),
        )

    def __bool__(self) -> bool:
        return bool(self.student or self.teacher)


@dataclass
class Features:
    """Intermediate feature maps of one batch, by stage index, as the training step computed them, and each
    image's index in the training set (``indices``, (N,) long; None outside training), for losses that keep
    a per-image memory (CRD)."""

    student: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None


class DistillationLoss(nn.Module):
    """Base class: subclasses return their weighted terms by name; the loss is their sum.

    ``loss(student_logits, teacher_logits, target)`` with ``target`` either class indices (N,) or
    per-class probabilities (N, C) when mixup/cutmix mixed the labels. After each call ``last_terms``
    holds the detached terms, so the training step logs every one as ``train/loss/<term>``.

    The module calls four hooks on every loss, so no loss needs a special case in the module:
    ``bind`` once before training (build parts sized by the models), ``bind_data`` once the training
    set is known (build parts sized by it, before a checkpoint is restored into them), ``start_epoch``
    at the start of every training epoch (follow training progress), ``feature_stages`` (intermediate
    features to compute for ``compute_terms``). The defaults do nothing.
    """

    #: False for label-only losses: the training step then skips the teacher's forward pass.
    uses_teacher: bool = True
    #: False for losses that read only the teacher's features, which an embedding teacher (no classifier) can teach.
    uses_teacher_logits: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def bind(self, student: Classifier, teacher: nn.Module | None) -> None:
        """Called once by the module before training, with the models this loss will compare (the teacher is
        a ``kd.teachers.FrozenTeacher``: ``forward_with_features`` and ``feature_info`` like a Classifier)."""

    def check_networks(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called before any work (nothing trained or loaded yet) with the bare networks, possibly built on the meta
        device (shapes, no values; ``teacher`` None when unknown): refuse here what ``bind`` would refuse later."""

    def bind_data(self, num_samples: int) -> None:
        """Called by the module when fitting starts (before a checkpoint is restored and before the optimizer is
        built), with the number of images in the training set: the range of ``Features.indices``."""

    def start_epoch(self, epoch: int) -> None:
        """Called by the module at the start of every training epoch (0-based)."""

    def feature_stages(self) -> FeatureStages:
        return FeatureStages()

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_terms(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
        features: Features,
    ) -> dict[str, torch.Tensor]:
        """Logit losses implement ``terms``; losses that read intermediate features override this."""
        return self.terms(student_logits, teacher_logits, target)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
        features: Features | None = None,
    ) -> torch.Tensor:
        # The teacher is a fixed target: whatever produced its outputs, no gradient may flow back into it.
        if teacher_logits is not None:
            teacher_logits = teacher_logits.detach()
        features = features or Features()
        features = Features(features.student, {k: v.detach() for k, v in features.teacher.items()}, features.indices)
        terms = self.compute_terms(student_logits, teacher_logits, target, features)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return torch.stack(list(terms.values())).sum()
