from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.losses.stages import channels, check_named_layers, layer_list, layer_pairs


def resolve_stage(stage: int, info: list[dict], role: str, key: str) -> int:
    if not info:
        raise KdError(
            f"loss=fitnet reads intermediate features, but the {role} network exposes none (it needs timm's "
            "feature_info and forward_intermediates, as timm models and kd's ConvNet have); choose another loss"
        )
    if not -len(info) <= stage < len(info):
        raise KdError(
            f"loss.{key}={stage} is out of range: the {role} has {len(info)} stages (0 to {len(info) - 1}, "
            "or -1 for the last); choose one of them"
        )
    return stage % len(info)


def match_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger feature map down to the smaller one's height and width."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


class FitNet(DistillationLoss):
    """FitNets (Romero et al., ICLR 2015) hint loss, trained jointly with the label loss as in mdistiller:
    ``ce_weight * CE + hint_weight * MSE(adapter(F_s), F_t)``.

    ``F_s`` is the student's feature map at ``student_stage``, ``F_t`` the teacher's at ``teacher_stage``
    (timm's ``feature_info`` stages; -1 is the last), ``adapter`` a learned 1x1 convolution from the
    student's channels to the teacher's. When the two maps differ in height and width, the larger is
    average-pooled to the smaller's size. The adapter belongs to the loss: it is trained (it is in
    the module's parameters, hence in the optimizer), saved in checkpoints as ``loss.adapter.*``, and
    never part of the exported student.
    """

    uses_teacher_logits = False

    def __init__(
        self,
        student_stage: int = -1,
        teacher_stage: int = -1,
        hint_weight: float = 1.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.student_stage: int | str = student_stage
        self.teacher_stage: int | str = teacher_stage
        self.layers = (layer_list(student_layers, "student_layers"), layer_list(teacher_layers, "teacher_layers"))
        self.hint_weight = check_weight("hint_weight", hint_weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.adapter: nn.Conv2d | None = None

    def check_networks(self, student, teacher) -> None:
        check_named_layers(student, teacher, self.layers, "fitnet", 1)

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return  # label-only tasks refuse this loss anyway (it uses the teacher)
        if self.layers[0] is None:
            info = student.feature_info()
            self.student_stage = resolve_stage(self.student_stage, info, "student", "student_stage")
        if self.layers[1] is None:
            info = teacher.feature_info()
            self.teacher_stage = resolve_stage(self.teacher_stage, info, "teacher", "teacher_stage")
        if self.layers != (None, None):  # one named layer each (FitNets' hint and guided layers)
            stages = (
                None if self.layers[0] else [self.student_stage],
                None if self.layers[1] else [self.teacher_stage],
            )
            ([self.student_stage], [self.teacher_stage]) = layer_pairs(
                student, teacher, stages, self.layers, "fitnet", 1
            )
        [in_channels] = channels(student, [self.student_stage])
        [out_channels] = channels(teacher, [self.teacher_stage])
        self.adapter = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def feature_stages(self) -> FeatureStages:
        return FeatureStages(
            student=self.layers[0] if self.adapter is None and self.layers[0] else (self.student_stage,),
            teacher=self.layers[1] if self.adapter is None and self.layers[1] else (self.teacher_stage,),
        )

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        if self.adapter is None:
            raise KdError("loss=fitnet was used before bind(student, teacher) built its adapter; this is a bug in kd")
        student_map = features.student[self.student_stage].float()
        adapted = self.adapter(student_map)
        adapted, teacher_map = match_size(adapted, features.teacher[self.teacher_stage])
        terms = {"hint": self.hint_weight * F.mse_loss(adapted.float(), teacher_map.float())}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
