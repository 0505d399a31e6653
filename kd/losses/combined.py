from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from kd.errors import KdError
from kd.losses.base import DistillationLoss, Features, FeatureStages


class WeightedSum(DistillationLoss):
    """A weighted sum of other losses, built from config alone: ``sum_k weight_k * loss_k``.

    ``terms`` maps a name to ``{weight: float, loss: <a loss config>}``. Each child's terms are logged
    as ``<name>`` (a child with a single term of the same name) or ``<name>/<term>``, already weighted.
    Every hook (bind, bind_data, start_epoch, feature_stages) reaches every child.
    """

    def __init__(self, terms: Mapping[str, Mapping]) -> None:
        super().__init__()
        if not terms:
            raise KdError("loss.terms is empty; list at least one {weight, loss} entry")
        self.weights: dict[str, float] = {}
        children = {}
        for name, spec in terms.items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("loss"), DistillationLoss):
                raise KdError(f"loss.terms.{name} must be {{weight: <number>, loss: <a loss config>}}")
            weight = float(spec.get("weight", 1.0))
            if weight < 0:
                raise KdError(f"loss.terms.{name}.weight={weight} must not be negative")
            self.weights[name] = weight
            children[name] = spec["loss"]
        self.losses = nn.ModuleDict(children)

    @property
    def uses_teacher(self) -> bool:  # type: ignore[override]
        return any(loss.uses_teacher for loss in self.losses.values())

    @property
    def uses_teacher_logits(self) -> bool:  # type: ignore[override]
        return any(loss.uses_teacher and loss.uses_teacher_logits for loss in self.losses.values())

    def bind(self, student, teacher) -> None:
        for loss in self.losses.values():
            loss.bind(student, teacher)

    def check_networks(self, student, teacher) -> None:
        for loss in self.losses.values():
            loss.check_networks(student, teacher)

    def bind_data(self, num_samples: int) -> None:
        for loss in self.losses.values():
            loss.bind_data(num_samples)

    def start_epoch(self, epoch: int) -> None:
        for loss in self.losses.values():
            loss.start_epoch(epoch)

    def feature_stages(self) -> FeatureStages:
        stages = FeatureStages()
        for loss in self.losses.values():
            stages = stages | loss.feature_stages()
        return stages

    def compute_terms(self, student_logits, teacher_logits, target, features: Features):
        terms = {}
        for name, loss in self.losses.items():
            child = loss.compute_terms(student_logits, teacher_logits if loss.uses_teacher else None, target, features)
            for term, value in child.items():
                terms[name if term == name and len(child) == 1 else f"{name}/{term}"] = self.weights[name] * value
        return terms
