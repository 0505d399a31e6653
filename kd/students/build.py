"""The student of a run: its architecture, its pretrained weights, and the rules a student follows.

A student to be trained (``new_head``) gets a new classifier when its weights were trained for
another number of classes, and the run says so; eval, predict and export use weights as they are.
``zero_init_last_bn`` starts the last BatchNorm gamma of every residual block at zero, for a
student trained from scratch only.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.models import Classifier
from kd.models.members import is_ensemble
from kd.students.zero_init import init_last_bn
from kd.weights.sources import ObtainAuto, load_weights, resolve


def build_student(
    model_cfg: DictConfig,
    num_classes: int,
    obtain_auto: ObtainAuto | None = None,
    new_head: bool = True,
) -> Classifier:
    """``model_cfg`` is a ``conf/model`` entry (``cfg.student``); ``obtain_auto`` trains ``weights: auto``."""
    if is_ensemble(model_cfg):
        raise KdError("student=ensemble is for teachers only; give the student one model, student=NAME")
    arch = instantiate(model_cfg.arch)
    net = arch.build(num_classes)
    source = resolve(model_cfg.get("weights"))
    name = model_cfg.get("name", "model")
    zero_init_last_bn = bool(model_cfg.get("zero_init_last_bn", False))
    if zero_init_last_bn and source.kind != "none":
        raise KdError(
            f"student.zero_init_last_bn=true is for a student trained from scratch, but student.weights="
            f"{model_cfg.get('weights')} loads weights; set student.weights=none or student.zero_init_last_bn=false"
        )
    if source.kind == "none":
        blocks = init_last_bn(net, zero=zero_init_last_bn)
        if zero_init_last_bn and blocks == 0:
            raise KdError(
                f"student.zero_init_last_bn=true, but student {name} has no residual blocks whose last "
                "BatchNorm could start at zero; set student.zero_init_last_bn=false"
            )
    preprocessing = load_weights(net, arch, model_cfg, "student", num_classes, obtain_auto, new_head=new_head)
    return Classifier(net, preprocessing or arch.preprocessing())
