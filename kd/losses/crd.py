from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import (
    channels,
    check_named_layers,
    full_precision,
    last_stage,
    last_stage_or_none,
    layer_list,
    layer_pairs,
    pooled,
    unbound,
)

EPS = 1e-7  # as CRD's code: inside the NCE logs


class Embed(nn.Module):
    """A linear map to ``feat_dim`` followed by L2 normalization: CRD's projection head."""

    def __init__(self, in_features: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.float()), dim=1)


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """CRD's NCE objective on (N, 1 + K) unnormalized probabilities, the positive first: noise from the uniform
    distribution 1/num_samples, K noise samples per positive; ``-(sum log h(pos) + sum log(1 - h(neg))) / N``."""
    k = scores.shape[1] - 1
    noise = k / num_samples
    positive, negative = scores[:, 0], scores[:, 1:]
    log_positive = torch.log(positive / (positive + noise + EPS))
    log_negative = torch.log(noise / (negative + noise + EPS))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


class ContrastiveRepresentationKD(DistillationLoss):
    """CRD (Tian et al., ICLR 2020), as its code (RepDistiller) runs it on CIFAR-100:
    ``ce_weight * CE + weight * (NCE(student embedding vs teacher memory) + NCE(teacher embedding vs student memory))``.

    Each network's penultimate feature (its last stage, global-average-pooled) goes through its own learned
    head (linear to ``feat_dim``, L2-normalized). Two memories hold one embedding per training image, the
    student's and the teacher's, each row updated by momentum at the batch's images
    (``m = nce_momentum * m + (1 - nce_momentum) * e``, then renormalized). For each image the positive is the
    other network's memory row of the same image, and ``num_negatives`` rows of other images drawn uniformly
    from the training set with torch's global generator (CRD's code can also draw them from other classes only;
    not here). Scores are ``exp(<e, m> / nce_t) / Z``, ``Z`` fixed from the first batch (mean score times the
    dataset size), as CRD's code does.

    The heads are trained with the student (in the optimizer); heads, memories and the ``Z`` constants are in
    the checkpoint as ``loss.*`` (the memories and ``Z`` as buffers), so a resumed run continues exactly. Each
    process keeps its own memory under DDP (not synchronized).
    """

    uses_teacher_logits = False

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        nce_t: float = 0.07,
        nce_momentum: float = 0.5,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(feat_dim, int) or feat_dim < 1:
            raise KdError(f"loss.feat_dim={feat_dim} must be a positive integer; CRD uses 128")
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise KdError(f"loss.num_negatives={num_negatives} must be a positive integer; CRD uses 16384")
        if nce_t <= 0:
            raise KdError(f"loss.nce_t={nce_t} must be positive; CRD uses 0.07")
        if not 0.0 <= nce_momentum < 1.0:
            raise KdError(f"loss.nce_momentum={nce_momentum} must lie in [0, 1); CRD uses 0.5")
        self.weight = check_weight("weight", weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.nce_t = nce_t
        self.nce_momentum = nce_momentum
        self.stages: FeatureStages | None = None
        self.embed_student: Embed | None = None
        self.embed_teacher: Embed | None = None
        self.num_samples = 0
        self.layers = (layer_list(student_layers, "student_layers"), layer_list(teacher_layers, "teacher_layers"))

    def check_networks(self, student, teacher) -> None:
        check_named_layers(student, teacher, self.layers, "crd", 1)

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return
        if self.layers != (None, None):  # one named layer each; a side not named: its last stage
            last = last_stage_or_none(student, teacher, self.layers, "crd")
            self.stages = FeatureStages(*layer_pairs(student, teacher, last, self.layers, "crd", 1))
        else:
            s, t = last_stage(student, teacher, "crd")
            self.stages = FeatureStages((s,), (t,))
        self.embed_student = Embed(channels(student, self.stages.student)[0], self.feat_dim)
        self.embed_teacher = Embed(channels(teacher, self.stages.teacher)[0], self.feat_dim)

    def bind_data(self, num_samples: int) -> None:
        """Memories of ``num_samples`` rows, uniform in +-1/sqrt(feat_dim / 3) as CRD's code starts them; ``Z`` -1
        (not yet fixed). Before a checkpoint restore, which then overwrites them."""
        if num_samples < 2:
            raise KdError(f"loss=crd contrasts images of the training set, but it has {num_samples}; use more images")
        if num_samples == self.num_samples:
            return  # already sized (a second fit of the same module): keep what the memories learned
        self.num_samples = num_samples
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.embed_student.linear.weight.device if self.embed_student is not None else None
        for name in ("memory_student", "memory_teacher"):
            memory = torch.rand(num_samples, self.feat_dim, device=device) * (2 * bound) - bound
            self.register_buffer(name, memory)
        self.register_buffer("normalizers", torch.full((2,), -1.0, device=device))

    def feature_stages(self) -> FeatureStages:
        return self.stages or unbound(self.layers)

    def draw_negatives(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, 1 + K) rows of the memories: each image's own index, then K drawn uniformly (global generator)."""
        negatives = torch.randint(0, self.num_samples, (len(indices), self.num_negatives))
        return torch.cat([indices.cpu()[:, None], negatives], dim=1).to(indices.device)

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        if self.embed_student is None or not self.num_samples:
            raise KdError("loss=crd was used before bind and bind_data built its heads and memories; a bug in kd")
        if features.indices is None:
            raise KdError("loss=crd needs each image's training-set index (Features.indices); train with kd's module")
        indices = features.indices.long()
        if indices.min() < 0 or indices.max() >= self.num_samples:
            raise KdError(
                f"loss=crd got image index {int(indices.max())} but its memory holds {self.num_samples} images; "
                "this is a bug in kd"
            )
        rows = self.draw_negatives(indices)
        with full_precision(student_logits):
            contrast = self.contrast(features, indices, rows)
        terms = {"crd": self.weight * contrast}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms

    def contrast(self, features: Features, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Both NCE terms for the batch, then the memories' momentum update at ``indices``."""
        student = self.embed_student(pooled(features.student[self.stages.student[0]]))
        teacher = self.embed_teacher(pooled(features.teacher[self.stages.teacher[0]]))
        # student embedding against the teacher's memory, teacher embedding against the student's
        scores_student = torch.exp(torch.einsum("nkd,nd->nk", self.memory_teacher[rows], student) / self.nce_t)
        scores_teacher = torch.exp(torch.einsum("nkd,nd->nk", self.memory_student[rows], teacher) / self.nce_t)
        with torch.no_grad():
            if self.normalizers[0] < 0:  # fixed once, from the first batch, as CRD's code does
                self.normalizers[0] = scores_student.mean() * self.num_samples
                self.normalizers[1] = scores_teacher.mean() * self.num_samples
            self.update_memory(self.memory_student, indices, student)
            self.update_memory(self.memory_teacher, indices, teacher)
        return nce_loss(scores_student / self.normalizers[0], self.num_samples) + nce_loss(
            scores_teacher / self.normalizers[1], self.num_samples
        )

    def update_memory(self, memory: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        mixed = memory[indices] * self.nce_momentum + embeddings.detach() * (1 - self.nce_momentum)
        memory[indices] = F.normalize(mixed, dim=1)
