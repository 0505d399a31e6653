"""Architectures: a recipe that builds a network for a class count, and knows its preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import timm
from torch import nn

from kd.models.classifier import Preprocessing


class Arch(Protocol):
    def build(self, num_classes: int) -> nn.Module: ...

    def preprocessing(self) -> Preprocessing: ...

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        """State-dict key prefixes of the final classifier (replaced when the class count differs)."""
        ...


def last_linear_prefix(net: nn.Module) -> tuple[str, ...]:
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    return (names[-1] + ".",) if names else ()


class TimmArch:
    """Any timm model, by its timm name (``resnet50d`` is PaddleClas's ResNet50_vd)."""

    def __init__(self, model_name: str, in_chans: int = 3, **kwargs) -> None:
        self.model_name = model_name
        self.in_chans = in_chans
        self.kwargs = kwargs

    def build(self, num_classes: int) -> nn.Module:
        return timm.create_model(
            self.model_name, pretrained=False, num_classes=num_classes, in_chans=self.in_chans, **self.kwargs
        )

    def preprocessing(self, pretrained_cfg: dict | None = None) -> Preprocessing:
        cfg = pretrained_cfg or timm.models.get_pretrained_cfg(self.model_name).to_dict()
        _, height, width = cfg["input_size"]
        return Preprocessing(
            mean=tuple(cfg["mean"])[: self.in_chans] if self.in_chans != 3 else tuple(cfg["mean"]),
            std=tuple(cfg["std"])[: self.in_chans] if self.in_chans != 3 else tuple(cfg["std"]),
            input_size=(self.in_chans, height, width),
            interpolation=cfg.get("interpolation", "bilinear"),
            crop_pct=cfg.get("crop_pct", 0.875),
        )

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        name = net.pretrained_cfg.get("classifier") if hasattr(net, "pretrained_cfg") else None
        names = name if isinstance(name, list | tuple) else [name] if name else []
        return tuple(n + "." for n in names) or last_linear_prefix(net)


class ModuleArch:
    """A network class of our own (the small digits networks), with its preprocessing stated in config."""

    def __init__(
        self,
        net: Callable[..., nn.Module],
        mean: list[float],
        std: list[float],
        input_size: list[int],
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
    ) -> None:
        self.net = net
        self._preprocessing = Preprocessing(
            mean=tuple(mean),
            std=tuple(std),
            input_size=tuple(input_size),
            interpolation=interpolation,
            crop_pct=crop_pct,
        )

    def build(self, num_classes: int) -> nn.Module:
        return self.net(num_classes=num_classes, in_chans=self._preprocessing.in_chans)

    def preprocessing(self, pretrained_cfg: dict | None = None) -> Preprocessing:
        return self._preprocessing

    def classifier_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        return last_linear_prefix(net)
