"""Feature stages for kd's CIFAR networks, in timm's ``feature_info`` / ``forward_intermediates`` contract.

Each CIFAR network of the KD literature (ResNet, WRN, VGG, MobileNetV2, ShuffleNet) is a stem and a few
stages, then a head (pooling and a linear classifier). A network lists its stages as functions, in the
order the forward pass runs them; ``forward``, ``forward_intermediates`` and ``forward_head`` are then
the same for all of them, so feature losses (``loss=fitnet``) can read any stage of any of them.

The stages are the feature maps mdistiller's networks return as ``feats`` (stem first, then one per
stage, post-activation where the network has an activation there): stage ``i`` here is its
``feats[i]``, so mdistiller's ``FITNET.HINT_LAYER: 2`` is ``loss.student_stage=2 loss.teacher_stage=2``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def stage_info(num_chs: int, reduction: int, module: str) -> dict:
    """One ``feature_info`` entry: channels, downsampling of a 32 px input, the module that produces it."""
    return {"num_chs": num_chs, "reduction": reduction, "module": module}


class StagedNet(nn.Module):
    """Base class: subclasses set ``feature_info`` and implement ``stage_forwards`` and ``forward_head``."""

    feature_info: list[dict]

    def stage_forwards(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One function per ``feature_info`` entry; run in order they are the network's trunk."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last stage's output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stage_forwards():
            x = stage(x)
        return self.forward_head(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, intermediates_only: bool = False, **_
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: the outputs of the stages in ``indices`` (an int n: the last n), and the
        final stage's output, which ``forward_head`` turns into logits."""
        stages = self.stage_forwards()
        count = len(stages)
        if indices is None:
            indices = list(range(count))
        elif isinstance(indices, int):
            indices = list(range(count - indices, count))
        wanted = {i % count for i in indices}
        intermediates = []
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


def init_like_crd(net: nn.Module, linear_std: float | None = None) -> None:
    """The initialization of CRD's CIFAR networks: He-normal convolutions (fan out), BatchNorm 1 and 0,
    zero biases; the linear layer's weight N(0, ``linear_std``) where given, else PyTorch's default."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
