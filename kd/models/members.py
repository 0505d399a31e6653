"""The members of ``teacher=ensemble``: each one a model config, as if it had been chosen alone.

``teacher.members=[resnet152_vd,timm:convnext_tiny,torchvision:regnet_y_400mf]`` names zoo entries
(``conf/model/<name>.yaml``) and any timm or torchvision model (``conf/any_model/timm.yaml`` with ``model=NAME``);
``teacher.member_overrides.<i>`` is merged into member ``i`` (its weights, its arch arguments).
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from kd.errors import KdError
from kd.io import CONF_DIR

BACKENDS = ("timm", "torchvision")  # timm:NAME, torchvision:NAME
COMBINE = ("probs", "logits")


def is_ensemble(model_cfg: DictConfig | None) -> bool:
    return model_cfg is not None and model_cfg.get("members") is not None


def zoo_names() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


def member_config(spec: str) -> DictConfig:
    """The model config one member name stands for."""
    from kd.models.arch import closest

    backend, sep, name = spec.partition(":")
    if sep and backend in BACKENDS and name:
        node = OmegaConf.load(CONF_DIR / "any_model" / f"{backend}.yaml")
        node.model = name
    elif not sep and (CONF_DIR / "model" / f"{spec}.yaml").is_file():
        node = OmegaConf.load(CONF_DIR / "model" / f"{spec}.yaml")
    else:
        raise KdError(
            f"teacher.members has '{spec}', which is no zoo model (did you mean {closest(spec, zoo_names())}?); "
            "write a zoo name, timm:NAME or torchvision:NAME"
        )
    node.name = spec
    return node


def member_configs(teacher_cfg: DictConfig) -> list[DictConfig]:
    """One model config per member, with its ``member_overrides`` merged in; the ensemble's settings checked."""
    members = teacher_cfg.members
    if not isinstance(members, ListConfig | list) or len(members) < 2:
        raise KdError(
            f"teacher.members={members} must list at least two models, e.g. teacher.members=[resnet50_vd,timm:"
            "convnext_tiny]; for one teacher use teacher=NAME"
        )
    overrides = teacher_cfg.get("member_overrides") or {}
    unknown = [key for key in overrides if not str(key).isdigit() or int(key) >= len(members)]
    if unknown:
        raise KdError(
            f"teacher.member_overrides.{unknown[0]} names no member (there are {len(members)}, numbered from 0); "
            "use teacher.member_overrides.<index>.KEY=VALUE"
        )
    configs = []
    for index, spec in enumerate(members):
        node = member_config(str(spec))
        override = overrides.get(str(index), overrides.get(index)) if overrides else None
        configs.append(OmegaConf.merge(node, override) if override else node)
    combine = teacher_cfg.get("combine", "probs")
    if combine not in COMBINE:
        raise KdError(f"teacher.combine={combine} is unknown; use probs (mean of probabilities) or logits")
    weights = teacher_cfg.get("weights_per_member")
    numbers = weights is None or all(isinstance(w, int | float) and w >= 0 for w in weights)
    if weights is not None and (len(weights) != len(members) or not numbers or sum(weights) <= 0):
        raise KdError(
            f"teacher.weights_per_member={list(weights)} must give {len(members)} non-negative numbers, not all "
            "zero (one per member), or null for equal weights"
        )
    return configs
