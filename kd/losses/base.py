from __future__ import annotations

import torch
from torch import nn


class DistillationLoss(nn.Module):
    """Base class: subclasses return their weighted terms by name; the loss is their sum.

    After each call ``last_terms`` holds the detached terms, so the training step logs every one
    as ``train/loss/<term>``.
    """

    #: False for label-only losses: the training step then skips the teacher's forward pass.
    uses_teacher: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        terms = self.terms(student_logits, teacher_logits, target)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return torch.stack(list(terms.values())).sum()
