"""``teacher=ensemble``: several frozen teachers, one target.

Each member is a ``FrozenTeacher`` of its own: its normalization, weights, input size (the student's view resized
when it differs) and fingerprint. The target is a model of its own kind, so every logit loss, mixup, DDP and the
teacher-output cache treat it like one teacher:

- ``combine=probs`` (default): logits ``log(sum_i w_i softmax(z_i))``, whose softmax is the weighted mean of the
  members' probabilities (a temperature T then sharpens or softens that mixture, ``p^(1/T)``);
- ``combine=logits``: ``sum_i w_i z_i``, the weighted mean of the logits.

Feature losses need one network's feature maps; an ensemble has several, so its stages are refused before any work.
A named layer of one member (``loss.teacher_layers=[MEMBER/LAYER]``, the member by its name in ``teacher.members`` or
its index) is read in the same pass as that member's logits.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from kd.errors import KdError
from kd.teachers.frozen import FrozenTeacher

log = logging.getLogger("kd")


class EnsembleTeacher(nn.Module):
    """Frozen members combined into one teacher with ``FrozenTeacher``'s interface."""

    def __init__(
        self,
        members: list[FrozenTeacher],
        names: list[str],
        combine: str = "probs",
        weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.names = list(names)
        self.combine = combine
        total = float(sum(weights)) if weights is not None else float(len(members))
        self.member_weights = [float(w) / total for w in weights] if weights is not None else [1 / total] * len(members)
        self.member_fingerprints = [member.start_fingerprint for member in members]
        # One fingerprint for checkpoints and the cache: every member's, in order, with how they are combined.
        joined = "|".join([combine, *map(repr, self.member_weights), *self.member_fingerprints])
        self.start_fingerprint = hashlib.sha256(joined.encode()).hexdigest()

    @property
    def preprocessing(self):
        """The first member's; ``describe`` lists every member's (the cache's identity uses that)."""
        return self.members[0].preprocessing

    def describe(self) -> dict:
        return {
            "combine": self.combine,
            "weights": self.member_weights,
            "members": [
                {
                    "name": name,
                    "fingerprint": member.start_fingerprint,
                    "preprocessing": member.preprocessing.to_dict(),
                    "resize_to": list(member.resize_to) if member.resize_to else None,
                }
                for name, member in zip(self.names, self.members, strict=True)
            ],
        }

    def train(self, mode: bool = True) -> EnsembleTeacher:
        for member in self.members:
            member.train(mode)  # each stays frozen (FrozenTeacher.train)
        self.training = False
        return self

    def feature_info(self) -> list[dict]:
        raise KdError(
            "feature losses compare one teacher's feature maps, but teacher=ensemble has several; name one member's "
            "layer (loss.teacher_layers=[MEMBER/LAYER]), use a logit loss (kd, dist, dkd, ...) or one teacher"
        )

    def member_index(self, member: str) -> int:
        """A member by its name in teacher.members, or by its index."""
        if member in self.names:
            return self.names.index(member)
        if member.isdigit() and int(member) < len(self.members):
            return int(member)
        raise KdError(
            f"loss.teacher_layers names member '{member}', which teacher=ensemble lacks; write MEMBER/LAYER with "
            f"MEMBER one of {', '.join(self.names)} (or its index)"
        )

    def member_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [member(images) for member in self.members]

    def combined(self, logits: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([z.float() for z in logits])  # (members, batch, classes)
        weights = torch.tensor(self.member_weights, device=stacked.device).view(-1, 1, 1)
        if self.combine == "logits":
            return (weights * stacked).sum(dim=0)
        log_weights = torch.log(weights.clamp_min(torch.finfo(torch.float32).tiny))
        return torch.logsumexp(stacked.log_softmax(dim=2) + log_weights, dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.combined(self.member_logits(images))

    def forward_with_features(
        self, images: torch.Tensor, stages: tuple[int | str, ...] = ()
    ) -> tuple[torch.Tensor, dict[int | str, torch.Tensor]]:
        """The combined logits, and each ``MEMBER/LAYER`` map from that member's own pass."""
        if any(not isinstance(stage, str) or "/" not in stage for stage in stages):
            self.feature_info()  # refuses
        wanted: dict[int, dict[str, str]] = {}  # member index -> {layer: the key the loss asked for}
        for stage in stages:
            member, _, layer = stage.rpartition("/")
            wanted.setdefault(self.member_index(member), {})[layer] = stage
        logits, features = [], {}
        for index, member in enumerate(self.members):
            keys = wanted.get(index, {})
            member_logits, maps = member.forward_with_features(images, tuple(keys))
            logits.append(member_logits)
            features |= {keys[layer]: value for layer, value in maps.items()}
        return self.combined(logits), features

    @property
    def live(self):
        """The teacher that runs its network: this one (a ``CachedTeacher`` answers with the teacher it stores for)."""
        return self

    def check_unchanged(self) -> str:
        for member in self.members:
            member.check_unchanged()
        return self.start_fingerprint

    def end_fingerprints(self) -> list[dict[str, str]]:
        """Each member's fingerprint at the start and now (``check_unchanged`` has raised if one differs)."""
        return [
            {"name": name, "start": member.start_fingerprint, "end": member.check_unchanged()}
            for name, member in zip(self.names, self.members, strict=True)
        ]


def check_ensemble_loss(loss) -> None:
    """Before any work, for ``teacher=ensemble``: the loss does not need feature maps, which an ensemble cannot
    give. (Its members were checked, unknown timm or torchvision names included, when their specs were built.)"""
    teacher_stages = loss.feature_stages().teacher if loss is not None and loss.uses_teacher else ()
    if any(not isinstance(stage, str) or "/" not in stage for stage in teacher_stages):  # MEMBER/LAYER is read
        raise KdError(
            f"loss {type(loss).__name__} compares the teacher's feature maps, but teacher=ensemble has one set per "
            "member; use a logit loss (kd, dist, dkd, ...) or a single teacher"
        )


def fingerprint_record(teacher) -> dict:
    """``{"start", "end"}`` of the run's teacher (frozen, cached or ensemble), and every member's for an ensemble;
    ``check_unchanged`` raises if any changed."""
    inner = teacher.live  # a CachedTeacher stores for the frozen one
    if isinstance(inner, EnsembleTeacher):  # each member hashed once: its end fingerprint is the check
        members = inner.end_fingerprints()
        return {"start": teacher.start_fingerprint, "end": inner.start_fingerprint, "members": members}
    return {"start": teacher.start_fingerprint, "end": teacher.check_unchanged()}
