"""The real names of a run's models, for results.json, the student card, sweep summaries and dashboard tags.

``teacher=timm teacher.model=convnext_tiny.fb_in22k_ft_in1k`` is recorded as that architecture and those weights,
not as "timm"; so is a zoo entry whose ``arch.model_name`` was overridden, since the record is read from the
architecture that is built, never from the option's name.
"""

from __future__ import annotations

from typing import Any

from kd.models.arch import PRETRAINED
from kd.models.spec import EnsembleSpec, ModelSpec
from kd.weights.sources import WeightSource, resolve


def weights_name(source: WeightSource, arch: Any) -> str:
    """What ``weights=`` loads (its resolved ``source``), by name: the tag ``pretrained`` stands for, a file,
    auto or none."""
    if source.kind in ("none", "auto"):
        return source.kind
    if source.value == PRETRAINED and hasattr(arch, "default_weights"):
        return str(arch.default_weights())
    return str(source.value)


def model_record(spec: ModelSpec | EnsembleSpec | None) -> dict[str, Any] | None:
    """``{"name", "arch", "backend", "weights"}`` of one model; an ensemble lists its members."""
    if spec is None:
        return None
    if isinstance(spec, EnsembleSpec):
        members = [model_record(member) for member in spec.members]
        return {
            "name": "ensemble(" + ", ".join(m["name"] for m in members) + ")",
            "arch": "ensemble",
            "combine": spec.combine,
            "members": members,
        }
    arch = spec.arch
    source = resolve(spec.weights)
    weights = weights_name(source, arch)
    # The name a reader knows the model by: the timm tag or torchvision weights when published ones are loaded.
    published = source.kind == "published"
    name = weights if published and arch.backend == "timm" else arch.id
    if arch.backend == "kd" and spec.name not in (None, "custom"):
        name = spec.name  # kd's own zoo networks (resnet8, digits_teacher) are known by their entry
    if published and arch.backend == "torchvision":
        name = f"{arch.id}.{weights}"
    return {"name": name, "arch": arch.id, "backend": arch.backend, "weights": weights}


def model_label(spec: ModelSpec | EnsembleSpec | None) -> str | None:
    record = model_record(spec)
    return record["name"] if record else None
