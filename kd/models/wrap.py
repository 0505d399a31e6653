"""Plain ``nn.Module``s as kd models: a network plus the preprocessing its weights were trained with.

kd's data yields images in [0, 1] and every model normalizes them itself (``Classifier``). A network built
outside kd carries that knowledge in one of three places: timm models in their ``pretrained_cfg``,
torchvision's in the weights enum they were built with, anything else only in the user's head, so it is
asked for explicitly (``mean`` and ``std``, or ``normalized=True`` for data normalized already).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kd.errors import KdError
from kd.models.classifier import Classifier, Preprocessing


def in_channels(module: nn.Module) -> int | None:
    """The channel count of the first convolution (or timm's ``in_chans``); None for a network without one."""
    declared = getattr(module, "in_chans", None)
    if isinstance(declared, int):
        return declared
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None


def timm_preprocessing(module: nn.Module) -> Preprocessing | None:
    """From a timm model's ``pretrained_cfg`` (mean and std cut to the model's channel count, as kd's TimmArch)."""
    cfg = getattr(module, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "mean" not in cfg or "input_size" not in cfg:
        return None
    chans = in_channels(module) or len(cfg["mean"])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if chans != len(mean):
        mean, std = mean[:chans], std[:chans]
    _, height, width = cfg["input_size"]
    return Preprocessing(
        mean=mean,
        std=std,
        input_size=(chans, height, width),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=cfg.get("crop_pct", 0.875),
    )


def torchvision_preprocessing(weights: Any) -> Preprocessing:
    """From a torchvision weights enum member (``ResNet18_Weights.DEFAULT``): what its ``transforms()`` do."""
    transform = weights.transforms()
    crop = transform.crop_size[0]
    return Preprocessing(
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        input_size=(3, crop, crop),
        interpolation=transform.interpolation.value,
        crop_pct=crop / transform.resize_size[0],
    )


def as_classifier(
    module: nn.Module,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    normalized: bool = False,
    weights: Any = None,
) -> Classifier:
    """``module`` with its input normalization, as kd's teacher and student are: images in [0, 1] go in.

    Where the preprocessing comes from, first match wins: ``normalized=True`` (the data is normalized already,
    the model normalizes nothing), ``mean`` and ``std``, a torchvision ``weights`` enum member, a timm model's
    ``pretrained_cfg``. ``input_size`` is (channels, height, width); it defaults to the channel count of
    ``mean`` (or of the first convolution) and the source's image size. A ``Classifier`` is returned as it is.
    """
    if isinstance(module, Classifier):
        return module
    if not isinstance(module, nn.Module):
        raise KdError(f"expected a torch.nn.Module as model, got {type(module).__name__}; pass the network itself")
    name = type(module).__name__
    if normalized or mean is not None or std is not None:
        if (mean is None) != (std is None):
            raise KdError(f"as_classifier({name}) got only one of mean and std; give both, or normalized=True")
        chans = len(mean) if mean is not None else (input_size[0] if input_size else in_channels(module) or 3)
        size = tuple(input_size) if input_size else None
        if size is None or len(size) != 3:
            raise KdError(
                f"as_classifier({name}) needs input_size=(channels, height, width) of its images, e.g. (3, 32, 32), "
                f"with explicit mean and std or normalized=True (got {input_size})"
            )
        mean = tuple(float(v) for v in mean) if mean is not None else (0.0,) * chans
        std = tuple(float(v) for v in std) if std is not None else (1.0,) * chans
        if len(mean) != size[0] or len(std) != size[0]:
            raise KdError(
                f"as_classifier({name}) got {len(mean)} mean and {len(std)} std values for {size[0]} input channels; "
                "give one per channel"
            )
        return Classifier(module, Preprocessing(mean=mean, std=std, input_size=size, crop_pct=1.0))
    preprocessing = torchvision_preprocessing(weights) if weights is not None else timm_preprocessing(module)
    if preprocessing is None:
        raise KdError(
            f"kd cannot tell how {name} expects its images normalized (it is no timm model and no torchvision "
            "weights were named); wrap it with kd.as_classifier(model, mean=..., std=..., input_size=...) or "
            "kd.as_classifier(model, normalized=True, input_size=...)"
        )
    if input_size is not None:
        preprocessing = Preprocessing(
            preprocessing.mean,
            preprocessing.std,
            tuple(input_size),
            preprocessing.interpolation,
            preprocessing.crop_pct,
        )
    return Classifier(module, preprocessing)


def model_name(model: nn.Module) -> str:
    """A short name for results and cards: timm's architecture name, else the network's class name."""
    net = model.net if isinstance(model, Classifier) else model
    cfg = getattr(net, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(net).__name__


def output_classes(model: Classifier) -> int | None:
    """How many classes ``model`` predicts: timm's ``num_classes``, else one forward pass of a zero image in eval
    mode (no BatchNorm statistic moves). None when that pass fails (an input size the network does not take)."""
    declared = getattr(model.net, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters(), None)
    where = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    probe = torch.zeros(1, *model.preprocessing.input_size, **where)
    try:
        model.eval()
        with torch.no_grad():
            logits = model(probe)
    except Exception:  # noqa: BLE001 - unknown is an answer; the training step checks the logits again
        return None
    finally:
        for module, mode in modes:
            module.training = mode
    return int(logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
