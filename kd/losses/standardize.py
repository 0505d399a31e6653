"""Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): the one
transform every logit loss with ``logit_standardization=true`` applies to student and teacher logits."""

from __future__ import annotations

import torch

from kd.errors import KdError

EPS = 1e-7  # as the authors' code (sunshangquan/logit-standardization-KD): a constant row maps to 0, not NaN


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score of each row (each image's logits): ``(z - mean(z)) / (std(z) + 1e-7)`` over the classes, in float32.

    The student then matches the teacher's logit *relations*, not their range: a student whose logits are a
    shifted or scaled copy of the teacher's has a zero KD term. ``std`` is the unbiased one (divides by C - 1),
    as in the authors' code; the paper's population std differs by the constant sqrt((C - 1) / C), i.e. a
    slightly different temperature.
    """
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + EPS)


def maybe_standardize(
    enabled: bool, student: torch.Tensor, teacher: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both logit tensors standardized when ``enabled``, else unchanged (as float32)."""
    if not enabled:
        return student.float(), None if teacher is None else teacher.float()
    return standardize(student), None if teacher is None else standardize(teacher)


def check_standardization(value: object) -> bool:
    if not isinstance(value, bool):
        raise KdError(f"loss.logit_standardization={value!r} must be true or false; set it to one of them")
    return value
