"""The student of a run: its architecture, its pretrained weights, and the rules a student follows.

A student to be trained (``new_head``) gets a new classifier when its weights were trained for
another number of classes, and the run says so; eval, predict and export use weights as they are.
``zero_init_last_bn`` starts the last BatchNorm gamma of every residual block at zero, for a
student trained from scratch only.
"""

from __future__ import annotations

from kd.errors import KdError
from kd.models import Classifier
from kd.models.spec import EnsembleSpec, ModelSpec
from kd.students.zero_init import init_last_bn
from kd.weights.sources import load_weights, resolve


def build_student(
    spec: ModelSpec, num_classes: int, new_head: bool = True, zero_init_last_bn: bool = False
) -> Classifier:
    """The student ``spec`` names, for ``num_classes``; ``spec.obtain_auto`` trains ``weights: auto``."""
    if isinstance(spec, EnsembleSpec):
        raise KdError("student=ensemble is for teachers only; give the student one model, student=NAME")
    net = spec.arch.build(num_classes)
    source = resolve(spec.weights)
    name = spec.name or "model"
    if zero_init_last_bn and source.kind != "none":
        raise KdError(
            f"student.zero_init_last_bn=true is for a student trained from scratch, but student.weights="
            f"{spec.weights} loads weights; set student.weights=none or student.zero_init_last_bn=false"
        )
    if source.kind == "none":
        blocks = init_last_bn(net, zero=zero_init_last_bn)
        if zero_init_last_bn and blocks == 0:
            raise KdError(
                f"student.zero_init_last_bn=true, but student {name} has no residual blocks whose last "
                "BatchNorm could start at zero; set student.zero_init_last_bn=false"
            )
    preprocessing = load_weights(net, spec, "student", num_classes, new_head=new_head)
    return Classifier(net, preprocessing or spec.arch.preprocessing())
