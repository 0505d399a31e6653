"""Feature distillation from a teacher that gives features only (an embedding teacher: a self-supervised backbone,
CLIP's image tower, any timm model built with ``num_classes=0``), as LightlyTrain's distillation does."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.fitnet import match_size
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import channels, check_named_layers, layer_list, pooled, stage_info

DISTANCES = ("cosine", "mse")
#: The teacher's output itself (an embedding teacher's pooled features), in place of a named teacher layer.
OUTPUT = "output"


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """``1 - cos`` along the channels (per image, or per position of a map), or the mean squared error."""
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()
    return F.mse_loss(student.float(), teacher.float())


class FeatureKD(DistillationLoss):
    """``weight * D(projector(F_s), F_t) + ce_weight * CE`` (``ce_weight`` 0 by default: no label needed).

    ``F_t`` is the teacher's output (an embedding teacher's pooled features), or the map of its named layer
    (``teacher_layers``); ``F_s`` the student's last stage, global-average-pooled, or its named layer
    (``student_layers``, needed for a network without timm's stages). The projector is learned on the loss side
    (optimized, checkpointed as ``loss.projector.*``, never exported): a linear map onto a feature vector, a 1x1
    convolution onto a map (the larger map average-pooled to the smaller's size). ``D`` is ``1 - cos`` (``cosine``)
    or the mean squared error (``mse``).
    """

    uses_teacher_logits = False

    def __init__(
        self,
        distance: str = "cosine",
        weight: float = 1.0,
        ce_weight: float = 0.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise KdError(f"loss.distance={distance} is unknown; use cosine or mse")
        self.distance = distance
        self.weight = check_weight("weight", weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.layers = (layer_list(student_layers, "student_layers"), layer_list(teacher_layers, "teacher_layers"))
        self.stages: FeatureStages | None = None
        self.projector: nn.Module | None = None

    def check_networks(self, student, teacher) -> None:
        check_named_layers(student, teacher, self.layers, "feature_kd", 1)

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return
        self.check_networks(student, teacher)
        student_key = self.layers[0][0] if self.layers[0] else len(stage_info(student, "student", "feature_kd")) - 1
        [student_channels] = channels(student, [student_key])
        if self.layers[1]:
            [teacher_channels] = channels(teacher, [self.layers[1][0]])
            self.projector = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            self.stages = FeatureStages((student_key,), self.layers[1])
        else:
            teacher_features = teacher_output_size(teacher)
            self.projector = nn.Linear(student_channels, teacher_features)
            self.stages = FeatureStages((student_key,), ())

    def feature_stages(self) -> FeatureStages:
        return self.stages or FeatureStages(self.layers[0] or (-1,), self.layers[1] or ())

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        if self.projector is None:
            raise KdError("loss=feature_kd was used before bind(student, teacher) built its projector; a bug in kd")
        student_map = features.student[self.stages.student[0]]
        if self.stages.teacher:
            projected, teacher = match_size(
                self.projector(student_map.float()), features.teacher[self.stages.teacher[0]]
            )
        else:
            projected, teacher = self.projector(pooled(student_map)), teacher_logits.flatten(1)
        terms = {"feature": self.weight * feature_distance(projected, teacher, self.distance)}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms


def teacher_output_size(teacher) -> int:
    """The length of the teacher's output vector, from one pass of a zero image at its own input size."""
    param = next(teacher.parameters())
    images = torch.zeros(2, *teacher.preprocessing.input_size, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        output = teacher(images)
    return int(output.flatten(1).shape[1])
