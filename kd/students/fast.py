"""The student's training-step speed: channels-last memory format and ``torch.compile``.

Channels-last (NHWC) is what oneDNN on CPUs and tensor cores on GPUs prefer for convolutions (what it gains on
this CPU is measured in the README's Performance section). It changes only how the weights and activations are
laid out in memory, not their values: results equal NCHW's within float rounding
(the order of summation inside a convolution may differ). ``student.channels_last=auto`` turns it on for conv
nets only: a network with a ``Conv2d`` and no attention layer. Attention layers (ViTs, hybrids) work on
(tokens, channels) tensors, where NHWC buys nothing and each conversion costs a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kd.errors import KdError

#: Module class names that mark a network as attention-based (timm's ``Attention``, torch's ``MultiheadAttention``).
ATTENTION_NAMES = ("attention",)


def is_conv_net(model: nn.Module) -> bool:
    """A network with at least one ``Conv2d`` and no attention layer: where channels-last pays off."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    has_attention = any(
        isinstance(m, nn.MultiheadAttention) or any(n in type(m).__name__.lower() for n in ATTENTION_NAMES)
        for m in model.modules()
    )
    return has_conv and not has_attention


def channels_last_setting(setting: bool | str | None) -> bool | None:
    """``student.channels_last``: true, false, or None for auto (decided per network, see ``is_conv_net``)."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return None
    if isinstance(setting, bool):
        return setting
    raise KdError(f"student.channels_last={setting!r} is not one of true, false or auto; pick one of them")


def wants_channels_last(setting: bool | str | None, model: nn.Module) -> bool:
    """``student.channels_last``: true, false, or auto/None (= true for conv nets, see ``is_conv_net``)."""
    return FastPath(channels_last_setting(setting)).channels_last_for(model)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """A batch of images in NHWC memory order (a no-op when it already is, or is not a 4-d batch)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def check_compile(compile_student: bool, student_stages: tuple[int, ...]) -> None:
    """``student.compile=true`` compiles the plain forward pass; a loss that reads the student's intermediate
    features goes through ``forward_intermediates`` instead, which would run uncompiled, so it is refused."""
    if compile_student and student_stages:
        raise KdError(
            "student.compile=true compiles the student's plain forward pass, but this loss reads its intermediate "
            f"features (stages {list(student_stages)}), which would run uncompiled; set student.compile=false"
        )


@dataclass(frozen=True)
class FastPath:
    """The student's ``channels_last`` (None: auto) and ``compile`` settings, checked once: a task builds it before
    any work and hands it to ``DistillationModule(fast=...)``, which builds its own only when given none."""

    channels_last: bool | None = None
    compile: bool = False

    @classmethod
    def checked(cls, channels_last: bool | str | None, compile: bool, student_stages: tuple[int, ...]) -> FastPath:
        """Refuses ``compile`` with a loss that reads the student's intermediate features (``student_stages``, see
        ``check_compile``) and a ``channels_last`` value that is not true, false or auto."""
        check_compile(bool(compile), student_stages)
        return cls(channels_last_setting(channels_last), bool(compile))

    def channels_last_for(self, model: nn.Module) -> bool:
        """Whether ``model`` runs in channels-last memory order: the setting, or auto's choice for this network."""
        return is_conv_net(model) if self.channels_last is None else self.channels_last
