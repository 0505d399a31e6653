"""Stage choice shared by the feature losses (at, sp, pkt, rkd, crd): which of timm's ``feature_info`` stages of the
student are compared with which of the teacher, checked against the models before any training; and
``StagePairLoss``, the frame of the losses that compare those feature maps pair by pair."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.labels import check_label_smoothing, check_weight, label_cross_entropy
from kd.models import Classifier
from kd.models.layers import check_layers

Key = int | str  # a feature_info stage index, or a module name (kd.models.layers)


def stage_info(model, role: str, loss_name: str) -> list[dict]:
    info = model.feature_info()
    if not info:
        raise KdError(
            f"loss={loss_name} reads intermediate features, but the {role} network exposes none (it needs timm's "
            "feature_info and forward_intermediates, as timm models and kd's ConvNet and CIFAR ResNets have); "
            "choose another loss"
        )
    return info


def resolve(stages: Sequence[int], count: int, role: str, key: str) -> tuple[int, ...]:
    for stage in stages:
        if not isinstance(stage, int) or not -count <= stage < count:
            raise KdError(
                f"loss.{key}={list(stages)} has {stage!r}, out of range: the {role} has {count} stages (0 to "
                f"{count - 1}, or -1 for the last); choose among them"
            )
    return tuple(stage % count for stage in stages)


def network_of(model) -> torch.nn.Module:
    """The bare network inside kd's wrappers (a FrozenTeacher's Classifier's ``net``, a cache's teacher)."""
    if isinstance(model, Classifier):
        return model.net
    if callable(getattr(model, "lookup", None)) and isinstance(getattr(model, "teacher", None), torch.nn.Module):
        return network_of(model.teacher)  # kd.teachers.CachedTeacher
    if isinstance(getattr(model, "model", None), Classifier) and hasattr(model, "start_fingerprint"):
        return model.model.net  # kd.teachers.FrozenTeacher
    return model


def check_model_layers(model, names: Sequence[str], role: str, key: str) -> tuple[str, ...]:
    """Module names of ``model``; an ensemble teacher's as ``MEMBER/LAYER`` (its name in teacher.members, or its
    index), checked against that member."""
    if not isinstance(names, Sequence) or isinstance(names, str) or not names:
        raise KdError(f"loss.{key}={names!r} must be a list of module names, e.g. [layer3] or [blocks.6]")
    members = getattr(network_of(model), "members", None)
    if not isinstance(members, torch.nn.ModuleList):
        return check_layers(network_of(model), names, role, key)
    ensemble = network_of(model)
    for name in names:
        member, _, layer = str(name).rpartition("/")
        index = ensemble.member_index(member)
        check_layers(network_of(ensemble.members[index]), [layer], f"teacher member {member}", key)
    return tuple(names)


def probe_shapes(model, keys: Sequence[Key]) -> dict[Key, torch.Size]:
    """The feature-map shape of each of ``keys`` from one forward pass of zero images at the model's own input size,
    in eval mode (no BatchNorm statistic moves; every module's mode is restored)."""
    modes = [(module, module.training) for module in model.modules()]
    param = next(model.parameters())
    images = torch.zeros(2, *model.preprocessing.input_size, device=param.device, dtype=param.dtype)
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            _, features = model.forward_with_features(images, tuple(keys))
    finally:
        for module, mode in modes:
            module.training = mode
    return {key: features[key].shape for key in keys}


def channels(model, keys: Sequence[Key]) -> list[int]:
    """The channel count of each feature map: from ``feature_info`` for a stage, from a probe pass for a layer."""
    shapes = (
        probe_shapes(model, [k for k in keys if isinstance(k, str)]) if any(isinstance(k, str) for k in keys) else {}
    )
    return [shapes[k][1] if isinstance(k, str) else model.feature_info()[k]["num_chs"] for k in keys]


def side(model, role: str, stages, layers, loss_name: str) -> tuple[Key, ...] | None:
    """One network's feature keys: its named layers when given, else its stages (None: neither given)."""
    if layers is not None:
        return check_model_layers(model, layers, role, f"{role}_layers")
    if stages is not None:
        return resolve(stages, len(stage_info(model, role, loss_name)), role, f"{role}_stages")
    return None


def layer_pairs(student, teacher, stages: tuple, layers: tuple, loss_name: str, count: int | None = None):
    """Matching student and teacher keys where named layers were given on at least one side."""
    student_keys = side(student, "student", stages[0], layers[0], loss_name)
    teacher_keys = side(teacher, "teacher", stages[1], layers[1], loss_name)
    if student_keys is None or teacher_keys is None:
        given, missing = ("student", "teacher") if teacher_keys is None else ("teacher", "student")
        raise KdError(
            f"loss.{given}_layers names the {given}'s layers but nothing says which of the {missing}'s they meet; "
            f"give loss.{missing}_layers=[...] (or loss.{missing}_stages) of the same length"
        )
    if len(student_keys) != len(teacher_keys) or (count is not None and len(student_keys) != count):
        what = f"{count} each" if count is not None else "the same number"
        raise KdError(
            f"loss={loss_name} got {len(student_keys)} student and {len(teacher_keys)} teacher features; give {what} "
            "(the i-th student layer is compared with the i-th teacher layer)"
        )
    return student_keys, teacher_keys


def check_named_layers(student, teacher, layers: tuple, loss_name: str, count: int | None = None) -> None:
    """Before any work, on the bare networks: as many layers on each side, and every named layer exists
    (``check_networks`` of the feature losses)."""
    lengths = [len(names) for names in layers if names is not None]
    if (len(lengths) == 2 and lengths[0] != lengths[1]) or (count is not None and any(n != count for n in lengths)):
        what = f"{count} each" if count is not None else "the same number"
        raise KdError(
            f"loss={loss_name} got {len(layers[0] or ())} student_layers and {len(layers[1] or ())} teacher_layers; "
            f"give {what} "
            "(the i-th student layer is compared with the i-th teacher layer)"
        )
    if layers[0] is not None and student is not None:
        check_model_layers(student, layers[0], "student", "student_layers")
    if layers[1] is not None and teacher is not None:
        check_model_layers(teacher, layers[1], "teacher", "teacher_layers")


def stage_pairs(
    student, teacher, student_stages: Sequence[int] | None, teacher_stages: Sequence[int] | None, loss_name: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Matching student and teacher stages (non-negative indices). ``None`` for both: every stage but the first
    (the stem of ResNets), paired from the last backwards, as many as the shallower network has."""
    student_info = stage_info(student, "student", loss_name)
    teacher_info = stage_info(teacher, "teacher", loss_name)
    if student_stages is None and teacher_stages is None:
        pairs = max(1, min(len(student_info), len(teacher_info)) - 1)
        student_stages = list(range(-pairs, 0))
        teacher_stages = list(range(-pairs, 0))
    if student_stages is None or teacher_stages is None or len(student_stages) != len(teacher_stages):
        raise KdError(
            f"loss.student_stages={student_stages} and loss.teacher_stages={teacher_stages} must be lists of the same "
            "length (the i-th student stage is compared with the i-th teacher stage), or both null for the default"
        )
    if not student_stages:
        raise KdError(f"loss={loss_name} was given no stages; list at least one, or leave both null for the default")
    return (
        resolve(student_stages, len(student_info), "student", "student_stages"),
        resolve(teacher_stages, len(teacher_info), "teacher", "teacher_stages"),
    )


#: What a feature loss reports before ``bind`` has resolved its stages against the models: the last stage of
#: each, so callers (the preflight checks) already know that it reads features, as ``loss=fitnet`` reports.
UNBOUND = FeatureStages((-1,), (-1,))


def layer_list(layers: Sequence[str] | None, key: str) -> tuple[str, ...] | None:
    """A loss's ``student_layers`` / ``teacher_layers`` setting: None (stages decide), or a non-empty list of names."""
    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise KdError(f"loss.{key}={layers!r} must be a non-empty list of module names, e.g. [layer3] or [blocks.6]")
    if not all(isinstance(name, str) and name for name in layers):
        raise KdError(f"loss.{key}={list(layers)} must hold module names (strings), e.g. [layer3] or [blocks.6]")
    return tuple(layers)


def unbound(layers: tuple) -> FeatureStages:
    """``UNBOUND`` with the named layers of each side in place of its last stage."""
    return FeatureStages(layers[0] or UNBOUND.student, layers[1] or UNBOUND.teacher)


def last_stage_or_none(student, teacher, layers: tuple, loss_name: str) -> tuple:
    """For the losses on one (pooled) feature per network: the last stage of a side whose layer is not named."""
    return (
        None if layers[0] is not None else (len(stage_info(student, "student", loss_name)) - 1,),
        None if layers[1] is not None else (len(stage_info(teacher, "teacher", loss_name)) - 1,),
    )


def last_stage(student, teacher, loss_name: str) -> tuple[int, int]:
    """The last stage of each network: global-average-pooled, it is the penultimate (pre-classifier) feature."""
    return len(stage_info(student, "student", loss_name)) - 1, len(stage_info(teacher, "teacher", loss_name)) - 1


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) in float32: the global average pool that timm's and kd's heads apply before the
    classifier."""
    return feature_map.float().mean(dim=(2, 3))


def full_precision(like: torch.Tensor) -> torch.autocast:
    """A context with autocast off: the relation losses' Gram matrices, distances and exponentials stay in float32
    under ``trainer.precision=bf16-mixed`` / ``16-mixed``."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def check_bound(loss_name: str, bound: bool) -> None:
    if not bound:
        raise KdError(f"loss={loss_name} was used before bind(student, teacher) chose its stages; this is a bug in kd")


class StagePairLoss(DistillationLoss):
    """A loss on (student stage, teacher stage) feature maps plus the label cross-entropy (``ce_weight``, 0: off).

    What AT, SP, PKT, RKD and ReviewKD share: the stages are chosen in ``bind`` against the two models
    (``stage_pairs`` of the requested ones, or with ``last_stage_only`` the last stage of each), and the feature
    terms are computed in float32 under any autocast (``float32_terms``; a loss with trainable parts that should
    run under autocast turns it off). A subclass names itself (``name``, as in ``loss=NAME``) and implements
    ``feature_terms``.
    """

    name: str
    float32_terms = True
    uses_teacher_logits = False

    def __init__(
        self,
        ce_weight: float,
        label_smoothing: float,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        last_stage_only: bool = False,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.requested = (student_stages, teacher_stages)
        self.layers = (layer_list(student_layers, "student_layers"), layer_list(teacher_layers, "teacher_layers"))
        self.last_stage_only = last_stage_only
        self.stages: FeatureStages | None = None

    def check_networks(self, student, teacher) -> None:
        check_named_layers(student, teacher, self.layers, self.name, 1 if self.last_stage_only else None)

    def bind(self, student, teacher) -> None:
        if teacher is None:
            return
        if self.layers != (None, None):  # named layers; with last_stage_only one each, a side not named: its last
            if self.last_stage_only:
                stages, count = last_stage_or_none(student, teacher, self.layers, self.name), 1
            else:
                stages, count = self.requested, None
            self.stages = FeatureStages(*layer_pairs(student, teacher, stages, self.layers, self.name, count))
        elif self.last_stage_only:
            s, t = last_stage(student, teacher, self.name)
            self.stages = FeatureStages((s,), (t,))
        else:
            self.stages = FeatureStages(*stage_pairs(student, teacher, *self.requested, self.name))

    def feature_stages(self) -> FeatureStages:
        return self.stages or unbound(self.layers)

    def feature_terms(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The weighted feature terms from the (student map, teacher map) of every chosen stage pair."""
        raise NotImplementedError

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        check_bound(self.name, self.stages is not None)
        stage_pairs_of_batch = zip(self.stages.student, self.stages.teacher, strict=True)
        pairs = [(features.student[s], features.teacher[t]) for s, t in stage_pairs_of_batch]
        with full_precision(student_logits) if self.float32_terms else nullcontext():
            terms = self.feature_terms(pairs)
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * label_cross_entropy(student_logits, target, self.label_smoothing)
        return terms
