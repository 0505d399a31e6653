"""Build a Classifier from a model config: architecture + weights from their source."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.models.classifier import Classifier
from kd.models.init import init_last_bn
from kd.teachers.weights import NO_WEIGHTS, is_local_file, load_into, read_weights_file

log = logging.getLogger(__name__)

# Called for ``weights: auto``: trains the model once on the run's data and returns the cached file.
ObtainWeights = Callable[[DictConfig, str], Path]


def instantiate_arch(model_cfg: DictConfig):
    return instantiate(model_cfg.arch)


def build_classifier(
    model_cfg: DictConfig,
    num_classes: int,
    role: str,
    obtain_auto: ObtainWeights | None = None,
    allow_new_head: bool | None = None,
) -> Classifier:
    """``role`` is "teacher" or "student"; only a student to be trained (``allow_new_head``, the default for
    a student) may get a new classifier for another class count: eval, predict and export use the weights as
    they are."""
    arch = instantiate_arch(model_cfg)
    net = arch.build(num_classes)
    source = model_cfg.get("weights")
    name = model_cfg.get("name", "model")
    zero_init_last_bn = bool(model_cfg.get("zero_init_last_bn", False))
    if zero_init_last_bn and role != "student":
        raise KdError(f"{role}.zero_init_last_bn=true applies to a student trained from scratch only; remove it")
    if zero_init_last_bn and source not in NO_WEIGHTS:
        raise KdError(
            f"student.zero_init_last_bn=true is for a student trained from scratch, but student.weights={source} "
            "loads weights; set student.weights=none or student.zero_init_last_bn=false"
        )
    if source in NO_WEIGHTS:
        if role == "student":
            blocks = init_last_bn(net, zero=zero_init_last_bn)
            if zero_init_last_bn and blocks == 0:
                raise KdError(
                    f"student.zero_init_last_bn=true, but student {name} has no residual blocks whose last "
                    "BatchNorm could start at zero; set student.zero_init_last_bn=false"
                )
        log.info("%s %s: no weights given, random initialization", role, name)
        return Classifier(net, arch.preprocessing())
    if source == "auto":
        if obtain_auto is None:
            raise KdError(f"{role}.weights=auto needs a training run to obtain them; give {role}.weights=FILE")
        state, preprocessing = read_weights_file(obtain_auto(model_cfg, role), net)
        description = f"{role}.weights=auto"
    elif is_local_file(str(source)):
        state, preprocessing = read_weights_file(source, net)
        description = str(source)
    else:  # published weights by name: a timm tag, a torchvision weights name, or "pretrained"
        state, preprocessing = arch.pretrained_state(str(source))
        description = f"{arch.backend}:{source}"
    replaced = load_into(net, state, arch.classifier_prefixes(net), description)
    if replaced and not (role == "student" if allow_new_head is None else allow_new_head):
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
    return Classifier(net, preprocessing or arch.preprocessing())
