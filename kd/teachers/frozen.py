from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KdError
from kd.models import Classifier
from kd.teachers.precision import DTYPES, TeacherPrecision, describe_choice, resolve_precision, teacher_precision

log = logging.getLogger("kd")


def fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenTeacher(nn.Module):
    """A teacher that never changes: no gradients, eval mode whatever Lightning asks, outputs only.

    It is deliberately *not* registered as a submodule of the LightningModule, so it stays out of
    the optimizer, the checkpoint and any DDP wrapper. With ``bn_train_mode`` BatchNorm normalizes
    with batch statistics (as SSLD did) without writing any running statistic or counter.

    Speed: it runs under ``torch.inference_mode()`` (no autograd graph, no activation kept past its
    layer), in channels-last memory format when ``channels_last`` (faster on CPU with oneDNN and on
    GPUs with tensor cores; see the README's Performance section), compiled with ``torch.compile`` when
    ``compile``, and in ``precision`` (``kd.teachers.precision``): ``auto`` is bf16 autocast where the device
    computes bf16 natively and otherwise whatever autocast Lightning's precision plugin has opened (none under
    ``trainer.precision=32-true``); ``32`` turns autocast off, ``bf16`` and ``16`` turn it on. Training and
    validation both go through ``forward_with_features``, so the teacher's metrics come from the outputs the loss
    gets, which are float32 whatever the teacher computed in.
    """

    def __init__(
        self,
        model: Classifier,
        bn_train_mode: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        resize_to: tuple[int, int] | None = None,
        precision: TeacherPrecision = "auto",
    ) -> None:
        super().__init__()
        self.precision = teacher_precision(precision)
        self._resolved: dict[str, str] = {}  # device type -> 32 | bf16 | 16, logged the first time
        self.model = model.requires_grad_(False)
        self.bn_train_mode = bn_train_mode
        # The teacher's own input size when it differs from the student's: it then sees the student's view
        # (the same crop, the same mixup) resized, as FixRes and "patient and consistent" distillation do.
        self.resize_to = tuple(resize_to) if resize_to else None
        self._resize_logged = False
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # same values: the fingerprint does not change
        self.train(False)
        self.start_fingerprint = fingerprint(self)
        # Kept out of the module tree so state_dict() and the fingerprint see the weights only once.
        run = self.model.forward_with_features
        self.__dict__["run_model"] = compiled_for_inference(run) if compile else run

    @property
    def preprocessing(self):
        return self.model.preprocessing

    @property
    def embedding(self) -> bool:
        """True for a teacher without a classifier (timm's ``num_classes=0``): its output is its pooled features."""
        return is_embedding(self.model)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        if self.bn_train_mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # training=True with track_running_stats=False: batch statistics, no buffer update.
                    module.train(True)
                    module.track_running_stats = False
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[0]

    def feature_info(self) -> list[dict]:
        return self.model.feature_info()

    def forward_with_features(
        self, images: torch.Tensor, stages: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits and, for feature losses, the feature maps of ``stages``: one pass, same frozen regime."""
        weight = next(self.model.parameters())
        if weight.device != images.device:
            self.to(images.device)
        if images.is_floating_point() and images.dtype != weight.dtype:
            images = images.to(weight.dtype)  # trainer.precision=*-true hands over half inputs
        images = self.resized(images)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        # Weights in half precision (trainer.precision=*-true) compute in their own dtype, as before.
        full = weight.dtype == torch.float32
        with torch.inference_mode(), self.autocast(images.device.type) if full else nullcontext():
            logits, features = self.run_model(images, stages)
        # Normal tensors (not inference tensors), so losses can save them for the student's backward; float32 from
        # a float32 teacher whatever its autocast computed in (a copy either way).
        dtype = torch.float32 if full else logits.dtype
        return logits.to(dtype, copy=True), {stage: f.to(dtype, copy=True) for stage, f in features.items()}

    def resolved_precision(self, device_type: str) -> str:
        """What this teacher computes in on ``device_type`` (``32``, ``bf16``, ``16``); logged once per device type."""
        if device_type not in self._resolved:
            resolved = resolve_precision(self.precision, device_type)
            log.info(describe_choice(self.precision, resolved, device_type))
            self._resolved[device_type] = resolved
        return self._resolved[device_type]

    def autocast(self, device_type: str) -> AbstractContextManager:
        dtype = DTYPES[self.resolved_precision(device_type)]
        if dtype is not None:
            return torch.autocast(device_type, dtype=dtype)
        # An explicit 32 holds under trainer.precision=bf16-mixed too; auto leaves the trainer's choice in place.
        return torch.autocast(device_type, enabled=False) if self.precision == "32" else nullcontext()

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """The student's view at the teacher's own size (its interpolation; antialiased when shrinking)."""
        if self.resize_to is None or images.dim() != 4 or tuple(images.shape[-2:]) == self.resize_to:
            return images
        mode = self.preprocessing.interpolation if self.preprocessing.interpolation in RESIZE_MODES else "bilinear"
        shrinks = self.resize_to[0] < images.shape[-2] or self.resize_to[1] < images.shape[-1]
        if not self._resize_logged:
            log.info(
                "the teacher sees the student's %dx%d view resized to its own %dx%d (%s)",
                *images.shape[-2:],
                *self.resize_to,
                mode,
            )
            self._resize_logged = True
        return F.interpolate(
            images, size=self.resize_to, mode=mode, antialias=shrinks and mode != "nearest", align_corners=None
        )

    @property
    def live(self):
        """The teacher that runs its network: this one (a ``CachedTeacher`` answers with the teacher it stores for)."""
        return self

    def check_unchanged(self) -> str:
        end = fingerprint(self)
        if end != self.start_fingerprint:
            raise KdError(
                f"the teacher changed during the run (fingerprint {self.start_fingerprint[:12]} -> {end[:12]}); "
                "this is a bug in kd or in a custom loss, please report it with the config"
            )
        return end


def is_embedding(model: nn.Module) -> bool:
    """A network built without a classifier (timm's ``num_classes=0``): it outputs features, not class scores."""
    net = getattr(model, "net", model)
    return getattr(net, "num_classes", None) == 0


def compiled_for_inference(run: Callable) -> Callable:
    """``torch.compile`` with inductor's freezing: the teacher's weights never change, so they are compiled in
    as constants, BatchNorm folds into the convolutions and their weights are laid out for the CPU's kernels
    once: the same logits within float rounding, sooner.
    Freezing applies to graphs compiled without gradients only, which the teacher's are (``inference_mode``);
    it is set around each call, where a compile (the first, or a new batch shape) happens, not process-wide."""
    import torch._inductor.config as inductor_config  # only where a teacher is compiled

    compiled = torch.compile(run)

    def run_frozen(*args):
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    return run_frozen


RESIZE_MODES = ("bilinear", "bicubic", "nearest")  # F.interpolate's modes among timm's and torchvision's
