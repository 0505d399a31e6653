"""The label term shared by every loss that uses ground truth: hard labels or mixed (mixup/cutmix) soft labels.

Unlabeled images (``kd.data.unlabeled``) are masked here, once, for every label term. A hard target of -1 has no
label. A soft (mixed) target row sums to the image's *known share*: 1 for a mix of labeled images, less where an
unlabeled image was mixed in (``kd.data.mixup``), 0 for an unlabeled image mixed with another. The label term of
a row is its cross-entropy against the known part renormalized to sum to 1, and the batch's term is the mean of
these weighted by the known share, so an unknown share never meets a label and an all-unlabeled batch gives 0.
"""

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


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (N,) weighted by ``weights`` (N,); 0 (not NaN) when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def label_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices (N,) or against per-class probabilities (N, C), e.g. the
    mixed labels of mixup/cutmix. Label smoothing mixes the (renormalized) target with the uniform
    distribution. Unlabeled images and unknown shares are masked as the module docstring says."""
    if target.ndim == 2:
        target = target.float()
        share = target.sum(dim=1)
        if bool(((share - 1.0).abs() < 1e-6).all()):  # every label known: the plain computation
            return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
        log_probs = F.log_softmax(logits.float(), dim=1)
        # share * ((1 - eps) * target / share + eps / C): the renormalized, smoothed label weighted by its share.
        smoothed = (1.0 - label_smoothing) * target + label_smoothing * share[:, None] / logits.shape[1]
        return -(smoothed * log_probs).sum() / share.sum().clamp_min(1e-12)
    known = target >= 0
    if bool(known.all()):
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    per_image = F.cross_entropy(logits.float(), target.clamp_min(0), label_smoothing=label_smoothing, reduction="none")
    return masked_mean(per_image, known.float())


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices: as given (-1: no label), or the class with the largest share of a mixed (soft) label,
    -1 where the unknown share of the row is larger than that (the unknown counts as one more class)."""
    if target.ndim == 1:
        return target
    best, labels = target.float().max(dim=1)
    unknown = 1.0 - target.float().sum(dim=1)
    return torch.where(best >= unknown, labels, torch.full_like(labels, -1))
