"""Strong augmentation (timm's RandAugment / AutoAugment / AugMix, color jitter, random erasing) inside kd's
seeded views, and the teacher's view of an image (``teacher.view``).

The settings are timm's, named as timm's ``create_transform`` and ``train.py`` name them: ``auto_augment``
(``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``, ``original``, ``v0``, ...; ``trivialaugment`` is torchvision's
``TrivialAugmentWide``), ``re_prob`` / ``re_mode`` / ``re_count`` (``RandomErasing``), ``color_jitter`` and the
random-resized crop's ``scale`` / ``ratio``. The ops are timm's and torchvision's own; the order is timm's
(``transforms_imagenet_train``): crop and flip, then auto-augment (or color jitter: timm turns color jitter off under
auto-augment), then the float tensor, then random erasing. Mixup comes after, on the batch (``kd.data.mixup``).

timm's ops draw from Python's ``random``, NumPy's global state and torch's generator: ``kd.data.sampling.SeededViews``
seeds all three per (seed, epoch, sample) around every view and restores them, so the teacher-output cache and a
resumed run rebuild each augmented view exactly.

Images reach the models in [0, 1] (each model normalizes with its own mean and std), so random erasing works on
[0, 1] images: ``re_mode=pixel`` / ``rand`` fill with N(0, 1) noise in those units, before the model's normalization
(timm erases after ImageNet normalization).

``teacher.view`` (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022,
Fig. 3: "fixed teacher", "independent noise", "consistent teaching"):

- ``consistent``: the teacher sees the student's tensor (the same crop, augmentation and mixup).
- ``fixed``: the teacher sees each image's un-augmented, centre-cropped view (the validation view): its outputs
  are the same in every epoch, as with precomputed soft labels (FKD-style).
- ``independent``: the teacher sees its own random view of the same image, drawn from a second seeded stream.

Mixup mixes the teacher's images with the student's pairs and weights in every mode.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    posterize,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from kd.errors import KdError

log = logging.getLogger("kd")

TEACHER_VIEWS = ("consistent", "fixed", "independent")
RE_MODES = ("const", "rand", "pixel")
TRIVIAL = "trivialaugment"

# True while SeededViews builds the teacher's fixed view: training transforms then give the un-augmented view.
_FIXED = contextvars.ContextVar("kd_fixed_view", default=False)


@contextmanager
def fixed_views() -> Iterator[None]:
    """Inside the block every kd training transform gives its image's un-augmented, centre-cropped view."""
    token = _FIXED.set(True)
    try:
        yield
    finally:
        _FIXED.reset(token)


def fixed_view_wanted() -> bool:
    return _FIXED.get()


def check_teacher_view(view: str) -> str:
    if view not in TEACHER_VIEWS:
        raise KdError(f"teacher.view={view} is not one of {', '.join(TEACHER_VIEWS)}; consistent is the default")
    return view


def pair(value: Sequence[float] | None, name: str, low: float, high: float | None = None) -> tuple[float, float] | None:
    """A (min, max) range from the config, checked: two numbers, min <= max, inside [low, high]."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise KdError(f"data.{name}={value} must be two numbers [min, max]")
    first, second = (float(v) for v in value)
    top = math.inf if high is None else high
    if not (low < first <= second <= top):
        span = f"({low}, {high}]" if high is not None else f"above {low}"
        raise KdError(f"data.{name}={list(value)} must be [min, max] with min <= max, both {span}")
    return first, second


@dataclass(frozen=True)
class Augment:
    """The strong-augmentation settings of a data module; all off by default (kd's plain views)."""

    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    color_jitter: float | Sequence[float] | None = None
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.re_prob, bool) or not isinstance(self.re_prob, int | float) or not 0 <= self.re_prob <= 1:
            raise KdError(f"data.re_prob={self.re_prob} must lie in [0, 1] (the chance of erasing a box per image)")
        if self.re_mode not in RE_MODES:
            raise KdError(f"data.re_mode={self.re_mode} is not one of {', '.join(RE_MODES)} (timm's RandomErasing)")
        if isinstance(self.re_count, bool) or not isinstance(self.re_count, int) or self.re_count < 1:
            raise KdError(f"data.re_count={self.re_count} must be a whole number of at least 1")
        jitter = self.color_jitter
        if jitter is not None:
            values = [jitter] if isinstance(jitter, int | float) else list(jitter)
            if len(values) not in (1, 3, 4) or any(isinstance(v, bool) or v < 0 for v in values):
                raise KdError(
                    f"data.color_jitter={jitter} must be one number >= 0, or 3 (brightness, contrast, saturation) "
                    "or 4 (and hue) of them"
                )
        object.__setattr__(self, "scale", pair(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", pair(self.ratio, "ratio", 0.0))
        if self.auto_augment is not None:  # builds it once: an unknown string stops the run before any work
            self.auto_augment_op(8, 1)

    @property
    def strong(self) -> bool:
        """Anything beyond the data module's own crop and flip."""
        return bool(self.auto_augment or self.re_prob > 0 or self.color_jitter is not None)

    def auto_augment_op(self, size: int, channels: int, interpolation: str = "bilinear") -> Callable | None:
        """timm's auto-augment for images of ``size`` pixels (PIL in, PIL out), as timm's factory builds it."""
        name = self.auto_augment
        if not name:
            return None
        fill = (0,) if channels == 1 else (124, 116, 104)  # digits: the black background; RGB: ImageNet's mean
        if name == TRIVIAL:
            return T.TrivialAugmentWide(fill=fill[0] if channels == 1 else list(fill))
        params: dict[str, Any] = {"translate_const": int(size * 0.45), "img_mean": fill}
        params["interpolation"] = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
        try:
            if name.startswith("rand"):
                return posterize_to_zero_bits(rand_augment_transform(name, params))
            if name.startswith("augmix"):
                return posterize_to_zero_bits(augment_and_mix_transform(name, {**params, "translate_pct": 0.3}))
            return posterize_to_zero_bits(auto_augment_transform(name, params))
        except (AssertionError, KeyError, ValueError, IndexError):
            raise KdError(
                f"data.auto_augment={name} is not a timm auto-augment string; use e.g. "
                f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0 or {TRIVIAL}"
            ) from None

    def pil_ops(self, size: int, channels: int, interpolation: str = "bilinear") -> list[Callable]:
        """The ops on the PIL image after the crop: auto-augment, or else color jitter (timm's rule)."""
        ops = []
        if self.auto_augment:
            ops.append(self.auto_augment_op(size, channels, interpolation))
        elif self.color_jitter is not None:
            jitter = self.color_jitter
            values = (float(jitter),) * 3 if isinstance(jitter, int | float) else tuple(float(v) for v in jitter)
            ops.append(T.ColorJitter(*values))
        return ops

    def tensor_ops(self) -> list[Callable]:
        """Random erasing on the float image, last (timm's order; mixup comes later, on the batch)."""
        if self.re_prob <= 0:
            return []
        return [RandomErasing(self.re_prob, mode=self.re_mode, max_count=self.re_count, device="cpu")]

    def log_choices(self) -> None:
        if self.auto_augment and self.color_jitter is not None:
            log.info("data.color_jitter=%s is off under data.auto_augment=%s, as in timm", self.color_jitter,
                     self.auto_augment)  # fmt: skip


def posterize_zero_safe(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image older Pillow gave (Pillow 11+ refuses 0 bits,
    which timm's ``PosterizeIncreasing`` asks for at magnitude 10, e.g. at m9 with magnitude noise)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def posterize_to_zero_bits(transform: Any) -> Any:
    """``transform`` (timm's RandAugment, AutoAugment or AugMix) with each posterize op made safe for 0 bits."""
    ops = list(getattr(transform, "ops", []))
    ops += [op for sub_policy in getattr(transform, "policy", []) for op in sub_policy]
    for op in ops:
        if getattr(op, "aug_fn", None) is posterize:
            op.aug_fn = posterize_zero_safe
    return transform


class TrainView:
    """A training transform with its fixed counterpart: ``random`` for training views, ``fixed`` (the image's
    un-augmented, centre-cropped view) inside ``fixed_views()`` (the teacher's view under ``teacher.view=fixed``)."""

    def __init__(self, random: Callable, fixed: Callable) -> None:
        self.random = random
        self.fixed = fixed

    def __call__(self, image: Any) -> Any:
        return self.fixed(image) if fixed_view_wanted() else self.random(image)

    def __repr__(self) -> str:
        return f"TrainView(random={self.random!r}, fixed={self.fixed!r})"


def to_float() -> list[Callable]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def strong_tail(augment: Augment, size: int, channels: int, interpolation: str = "bilinear") -> list[Callable]:
    """What follows a data module's own crop and flip on a PIL image: auto-augment or color jitter, the float
    tensor, random erasing."""
    return [*augment.pil_ops(size, channels, interpolation), *to_float(), *augment.tensor_ops()]


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A float (C, H, W) image in [0, 1] as an 8-bit PIL image (timm's auto-augment ops work on PIL images)."""
    pixels = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def pil_to_tensor(picture: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image as a float (C, H, W) tensor in [0, 1]."""
    pixels = torch.from_numpy(np.array(picture, dtype=np.uint8))
    pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.to(torch.float32).div_(255)


class StrongTensorView:
    """Strong augmentation of a float tensor image in [0, 1] (digits, fake data): to an 8-bit PIL image, an
    optional random-resized crop (``augment.scale`` / ``ratio``), auto-augment or color jitter, back to float,
    random erasing. The ops are called one after the other (no Compose: digits are 8x8, its overhead dominated)."""

    def __init__(self, augment: Augment, size: int, channels: int, interpolation: str = "bilinear") -> None:
        crop = []
        if augment.scale is not None or augment.ratio is not None:
            crop = [
                T.RandomResizedCrop(
                    size,
                    scale=augment.scale or (0.08, 1.0),
                    ratio=augment.ratio or (3 / 4, 4 / 3),
                    interpolation=InterpolationMode(interpolation),
                    antialias=True,
                )
            ]
        self.pil_ops = [*crop, *augment.pil_ops(size, channels, interpolation)]
        self.tensor_ops = augment.tensor_ops()
        self.active = bool(self.pil_ops or self.tensor_ops)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return image
        picture = tensor_to_pil(image)
        for op in self.pil_ops:
            picture = op(picture)
        image = pil_to_tensor(picture)
        for op in self.tensor_ops:
            image = op(image)
        return image

    def __repr__(self) -> str:
        if not self.active:
            return "StrongTensorView(off)"
        ops = ", ".join(repr(op).replace("\n", " ") for op in [*self.pil_ops, *self.tensor_ops])
        return f"StrongTensorView({ops})"
