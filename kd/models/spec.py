"""A model as a run names it: the objects its config entry (``conf/model/<name>.yaml``) stands for.

``kd.tasks`` builds these from the config (``hydra.utils.instantiate`` of the entry's ``arch``); everything below
the tasks (weights, teachers, students, results) takes them and never reads the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kd.models.arch import Arch


@dataclass(frozen=True)
class ModelSpec:
    """One model: its architecture, the name of its entry (``resnet50_vd``, ``timm``, ``custom``), what
    ``weights=`` says, and, for ``weights=auto``, how to obtain them (train the model once, or find it cached)."""

    arch: Arch
    name: str | None = None
    weights: str | None = None
    obtain_auto: Callable[[], Path] | None = None


@dataclass(frozen=True)
class EnsembleSpec:
    """``teacher=ensemble``: its members, how their outputs are combined (``probs`` or ``logits``), and the
    weight of each member (None: equal)."""

    members: tuple[ModelSpec, ...]
    combine: str = "probs"
    weights_per_member: tuple[float, ...] | None = None
    name: str = "ensemble"
