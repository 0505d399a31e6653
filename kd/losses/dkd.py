from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.losses.labels import check_label_smoothing, check_weight, hard_labels, label_cross_entropy, masked_mean
from kd.losses.standardize import check_standardization, maybe_standardize


def target_and_rest(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (N, C) at some temperature: the log of the binary distribution [p_target, 1 - p_target]
    (N, 2), and the log-softmax over the C - 1 non-target classes alone (N, C - 1).

    Both come from log-sum-exps of the logits, never from ``log(1 - p)``, so they stay finite when a
    probability rounds to 0 or 1.
    """
    is_target = F.one_hot(labels, logits.shape[1]).bool()
    others = logits[~is_target].view(logits.shape[0], -1)
    log_total = torch.logsumexp(logits, dim=1)
    log_target = logits[is_target] - log_total
    log_rest = torch.logsumexp(others, dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1), F.log_softmax(others, dim=1)


def warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """``min((epoch + 1) / warmup_epochs, 1)``, mdistiller's linear warmup of a term (epochs counted from 1);
    1 throughout when ``warmup_epochs`` is 0."""
    return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)


class DecoupledKD(DistillationLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): KD split into a target-class term and a non-target term,
    ``ce_weight * CE + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD)``.

    TCKD is the KL between teacher and student binary distributions [p_target, 1 - p_target]; NCKD the
    KL between their softmaxes over the non-target classes alone. Both are summed over classes and
    averaged over the batch. ``w(epoch) = min((epoch + 1) / warmup_epochs, 1)`` ramps the KD part up
    linearly over the first ``warmup_epochs`` epochs (mdistiller's schedule, its epochs counted from 1).
    With mixed (mixup/cutmix) labels the target class is the one with the largest share of the label. Both KD
    terms need a target class, so they average over the images that have one (``kd.losses.labels.hard_labels``):
    an unlabeled image (or a mix mostly of unlabeled images) counts in neither.
    With ``logit_standardization`` both logits are z-scored per image first (``kd.losses.standardize``); the
    label term always sees the raw logits.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.0,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdError(f"loss.temperature={temperature} must be positive; DKD uses 1 on ImageNet, 4 on CIFAR")
        if warmup_epochs < 0:
            raise KdError(f"loss.warmup_epochs={warmup_epochs} must be 0 or more (0: no warmup of the KD terms)")
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.kd_weight = warmup_weight(0, warmup_epochs)
        self.logit_standardization = check_standardization(logit_standardization)

    def start_epoch(self, epoch: int) -> None:
        self.kd_weight = warmup_weight(epoch, self.warmup_epochs)

    def terms(self, student_logits, teacher_logits, target):
        t = self.temperature
        labels = hard_labels(target)
        student, teacher = maybe_standardize(self.logit_standardization, student_logits, teacher_logits)
        known = (labels >= 0).float()
        labels = labels.clamp_min(0)  # a stand-in class for the masked rows, so the shapes stay whole
        student_binary, student_rest = target_and_rest(student / t, labels)
        teacher_binary, teacher_rest = target_and_rest(teacher / t, labels)
        tckd = masked_mean(F.kl_div(student_binary, teacher_binary, reduction="none", log_target=True).sum(1), known)
        nckd = masked_mean(F.kl_div(student_rest, teacher_rest, reduction="none", log_target=True).sum(1), known)
        scale = self.kd_weight * t * t
        terms = {"tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
