from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy


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

    def __init__(
        self,
        student_stage: int = -1,
        teacher_stage: int = -1,
        hint_weight: float = 1.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.student_stage = student_stage
        self.teacher_stage = teacher_stage
        self.hint_weight = check_weight("hint_weight", hint_weight)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.adapter: nn.Conv2d | None = None

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return  # label-only tasks refuse this loss anyway (it uses the teacher)
        student_info, teacher_info = student.feature_info(), teacher.feature_info()
        self.student_stage = resolve_stage(self.student_stage, student_info, "student", "student_stage")
        self.teacher_stage = resolve_stage(self.teacher_stage, teacher_info, "teacher", "teacher_stage")
        in_channels = student_info[self.student_stage]["num_chs"]
        out_channels = teacher_info[self.teacher_stage]["num_chs"]
        self.adapter = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def feature_stages(self) -> FeatureStages:
        return FeatureStages(student=(self.student_stage,), teacher=(self.teacher_stage,))

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
