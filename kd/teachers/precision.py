"""The precision a frozen teacher computes in: bf16 where the hardware computes it natively, else float32.

A teacher's forward pass is inference: no gradient flows through it, so bfloat16's 8-bit mantissa costs the
distillation nothing measurable (docs/performance.md, "The teacher in bf16"), and on hardware with bf16 units
(``kd.training.precision.native_bf16``) the pass takes about half the time of float32's. Elsewhere bf16 is
emulated and slower, so ``auto`` stays in float32 there.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from kd.errors import KdError
from kd.training import precision as hardware

log = logging.getLogger("kd")

TeacherPrecision = Literal["auto", "32", "bf16", "16"]
PRECISIONS: tuple[str, ...] = ("auto", "32", "bf16", "16")
DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def teacher_precision(value: object) -> str:
    """``value`` as one of ``auto``, ``32``, ``bf16``, ``16`` (Hydra reads ``32`` and ``16`` as numbers)."""
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise KdError(f"teacher.precision={value} is unknown; use auto, 32, bf16 or 16 (16 on GPUs only)")
    return text


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision a teacher set to ``precision`` computes in on ``device_type``: ``32``, ``bf16`` or ``16``."""
    precision = teacher_precision(precision)
    if precision == "16" and device_type == "cpu":
        raise KdError("teacher.precision=16 runs on GPUs only; use teacher.precision=bf16 or auto on a CPU")
    if precision == "auto":
        return "bf16" if hardware.native_bf16(device_type) else "32"
    return precision


def describe_choice(precision: str, resolved: str, device_type: str) -> str:
    """One log line: what the teacher computes in, and why."""
    if precision != "auto":
        name = {"32": "float32", "bf16": "bf16 autocast", "16": "float16 autocast"}[resolved]
        return f"the teacher runs in {name} (teacher.precision={precision}); its logits reach the loss in float32"
    if resolved == "bf16":
        why = hardware.hardware_name(device_type)
        return f"the teacher runs in bf16 autocast ({why}; teacher.precision=32 for float32); logits in float32"
    return (
        f"the teacher runs in float32 (or the trainer's mixed precision): this {device_type} has no native bf16, "
        "so teacher.precision=auto keeps float32"
    )


def computed_precisions(teacher: torch.nn.Module, device_type: str) -> list[str]:
    """What a frozen teacher, a cached one's or each member of an ensemble computes in on ``device_type``."""
    live = teacher.live  # a cached teacher's own network (kd.teachers.cache.CachedTeacher.live)
    members = getattr(live, "members", None) or [live]
    return sorted({member.resolved_precision(device_type) for member in members})
