"""Where a model's weights come from: ``weights=`` resolved to one source, in an order read top to bottom.

The same rules serve the teacher and the student; what each role may do with the result (a new
classifier for another class count, zero-gamma) is decided in ``kd.teachers`` and ``kd.students``.
A new source is one branch in ``resolve`` and one reader in ``read_source``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kd.errors import KdError
from kd.models.arch import HUB_PREFIXES
from kd.weights import files, paddle

if TYPE_CHECKING:
    from kd.models import Preprocessing
    from kd.models.spec import ModelSpec

log = logging.getLogger("kd")

NO_WEIGHTS = (None, "", "none", "null")  # weights=none: random initialization
AUTO = "auto"  # weights=auto: trained once with task=train on the run's data, then cached
LOCAL_SUFFIXES = (*files.TORCH_SUFFIXES, ".safetensors", ".pdparams")


@dataclass(frozen=True)
class WeightSource:
    """``kind`` is none, auto, hub (``hf-hub:`` / ``local-dir:``, read by timm), paddle (a PaddleClas
    ``.pdparams`` file), file (any other local file) or
    published (a name the architecture's backend fetches: ``pretrained``, a timm tag, torchvision weights)."""

    kind: str
    value: str | None = None


def is_local_file(weights: str) -> bool:
    return weights.endswith(LOCAL_SUFFIXES) or "/" in weights or weights.startswith(".")


def resolve(weights: object) -> WeightSource:
    """Where ``weights=`` points, checked in this order."""
    text = None if weights is None else str(weights)
    if text in NO_WEIGHTS:
        return WeightSource("none")
    if text == AUTO:
        return WeightSource("auto")
    if text.startswith(HUB_PREFIXES):  # before local files: hf-hub:timm/NAME and local-dir:/folder have a "/"
        return WeightSource("hub", text)
    if text.endswith(".pdparams"):
        return WeightSource("paddle", text)
    if is_local_file(text):
        return WeightSource("file", text)
    return WeightSource("published", text)


def read_source(
    source: WeightSource,
    net: nn.Module,
    spec: ModelSpec,
    role: str,
) -> tuple[dict[str, torch.Tensor], Preprocessing | None, str]:
    """The state dict a source gives for ``net`` (built by ``spec.arch``), the preprocessing it fixes (if any),
    and a description for the log."""
    arch = spec.arch
    if source.kind == "auto":
        if spec.obtain_auto is None:
            raise KdError(f"{role}.weights=auto needs a training run to obtain them; give {role}.weights=FILE")
        return files.read_state_dict(spec.obtain_auto()), None, f"{role}.weights=auto"
    if source.kind == "paddle":
        files.check_exists(Path(source.value).expanduser())
        return paddle.read_for(Path(source.value).expanduser(), net), paddle.PADDLECLAS_PREPROCESSING, source.value
    if source.kind == "file":
        return files.read_state_dict(source.value), None, source.value
    if source.kind == "hub":  # timm reads the hub's (or the folder's) config.json and weights
        if arch.backend != "timm":
            raise KdError(
                f"{role}.weights={source.value} are read by timm, but the {role} is a {arch.backend} model; "
                f"use a timm model ({role}=timm {role}.model=NAME) or a local weights file"
            )
        state, preprocessing = arch.pretrained_state(source.value)
        return state, preprocessing, source.value
    state, preprocessing = arch.pretrained_state(source.value)
    return state, preprocessing, f"{arch.backend}:{source.value}"


def load_weights(
    net: nn.Module, spec: ModelSpec, role: str, num_classes: int, new_head: bool = False
) -> Preprocessing | None:
    """Load ``spec``'s weights into ``net`` (built by ``spec.arch`` for ``num_classes``) strictly; returns the
    preprocessing the weights fix, if any.

    Only ``new_head`` (a student about to be trained) may get a new classifier when the weights were
    trained for another class count; anyone else is refused with one sentence.
    """
    source, name = resolve(spec.weights), spec.name or "model"
    if source.kind == "none":
        log.info("%s %s: no weights given, random initialization", role, name)
        return None
    state, preprocessing, description = read_source(source, net, spec, role)
    replaced = files.load_into(net, state, spec.arch.classifier_prefixes(net), description)
    if replaced and not new_head:
        raise KdError(
            f"{role} weights {description} were trained for another number of classes than the "
            f"dataset's {num_classes}; give {role} weights trained on these classes (task=train makes them)"
        )
    if replaced:
        log.info(
            "%s %s: loaded %s with a new %d-class classifier (the weights had another class count)",
            role,
            name,
            description,
            num_classes,
        )
    else:
        log.info("%s %s: loaded %s", role, name, description)
    return preprocessing
