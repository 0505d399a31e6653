from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses.base import DistillationLoss
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy

EPS = 1e-8  # as in the authors' code: keeps a constant row or column (zero spread) at correlation 0


def mean_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between matching rows of a and b, averaged over the rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)).mean()


class DIST(DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"):
    ``ce_weight * CE + beta * tau^2 * (1 - rho_inter) + gamma * tau^2 * (1 - rho_intra)``.

    With ``Y = softmax(logits / tau)`` of shape (N, C): ``rho_inter`` is the Pearson correlation of the
    student's and teacher's rows (each image's class distribution) averaged over the batch, ``rho_intra``
    that of their columns (each class's scores across the batch) averaged over the classes. It matches
    relations rather than exact probabilities, so it needs a batch of more than one image.
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 2.0,
        tau: float = 1.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise KdError(f"loss.tau={tau} must be positive; DIST uses 1 on ImageNet")
        self.beta = check_weight("beta", beta)
        self.gamma = check_weight("gamma", gamma)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.tau = tau
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def terms(self, student_logits, teacher_logits, target):
        scale = self.tau * self.tau
        student = F.softmax(student_logits.float() / self.tau, dim=1)
        teacher = F.softmax(teacher_logits.float() / self.tau, dim=1)
        terms = {
            "inter": self.beta * scale * (1 - mean_pearson(student, teacher)),
            "intra": self.gamma * scale * (1 - mean_pearson(student.T, teacher.T)),
        }
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
