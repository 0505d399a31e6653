"""The label term shared by every loss that uses ground truth: hard labels or mixed (mixup/cutmix) soft labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KdError


def check_label_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing < 1.0:
        raise KdError(f"loss.label_smoothing={label_smoothing} must lie in [0, 1); 0.1 is the usual choice")
    return label_smoothing


def check_weight(name: str, value: float) -> float:
    if value < 0:
        raise KdError(f"loss.{name}={value} must not be negative; it weights a loss term")
    return value


def label_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices (N,) or against per-class probabilities (N, C), e.g. the
    mixed labels of mixup/cutmix. Label smoothing mixes the target with the uniform distribution."""
    target = target.float() if target.is_floating_point() else target
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices: as given, or the class with the largest share of a mixed (soft) label."""
    return target.argmax(dim=1) if target.ndim == 2 else target
