"""The LightningModule: a trainable student, a frozen teacher beside it, a loss that compares them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd.data.mixup import BatchMixup
from kd.errors import KdError, NonFiniteError
from kd.losses.base import DistillationLoss, Features
from kd.models import Classifier
from kd.optim import OptimizerRecipe
from kd.students.fast import check_compile, to_channels_last, wants_channels_last
from kd.teachers import FrozenTeacher
from kd.teachers.cache import CachedTeacher

log = logging.getLogger("kd")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., object]


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def calibration_error(num_classes: int) -> MulticlassCalibrationError:
    """Expected calibration error over 15 equal-width confidence bins (fed probabilities, not logits)."""
    return MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")


class DistillationModule(L.LightningModule):
    """Trains ``student`` with ``loss(student_logits, teacher_logits, target)``.

    With ``teacher=None`` it is plain supervised training (``task=train``). The teacher is kept out of
    the module's registered children on purpose: it is never in ``parameters()``, ``state_dict()``,
    the optimizer or a DDP wrapper, and ``.train()`` cannot reach it. The loss is a registered child:
    its trainable parts (feature adapters) are optimized and checkpointed as ``loss.*``.

    ``optimizer`` is an ``OptimizerRecipe`` or a plain ``torch.optim`` partial; ``mixup`` (a
    ``BatchMixup``) mixes each training batch once, so teacher and student see the same tensor.
    ``channels_last`` (true, false or auto: conv nets only) keeps the student's weights and inputs in NHWC
    memory order, and ``compile`` runs its forward pass through ``torch.compile`` (see ``kd.students.fast``).
    """

    def __init__(
        self,
        student: Classifier,
        loss: DistillationLoss,
        optimizer: OptimizerRecipe | OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        num_classes: int,
        teacher: FrozenTeacher | CachedTeacher | None = None,
        mixup: BatchMixup | None = None,
        channels_last: bool | str | None = "auto",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if teacher is None and loss.uses_teacher:
            raise KdError(
                f"loss {type(loss).__name__} needs a teacher, but this task trains on labels only; use loss=ce"
            )
        self.student = student
        self.loss = loss
        self.__dict__["teacher"] = teacher  # bypasses nn.Module registration, see the class docstring
        loss.bind(student, teacher)
        check_compile(compile, loss.feature_stages().student)
        self.channels_last = wants_channels_last(channels_last, student)
        if self.channels_last:  # same values, another memory order; exported weights are written contiguous
            student.to(memory_format=torch.channels_last)
        # The compiled forward shares the student's parameters; kept out of the module tree (no second copy
        # of the weights in state_dict()).
        self.__dict__["student_forward"] = torch.compile(student) if compile else student
        self.num_classes = num_classes
        self.mixup = mixup
        is_recipe = optimizer is None or isinstance(optimizer, OptimizerRecipe)
        self.optimizer_factory = optimizer if is_recipe else OptimizerRecipe(optimizer)
        self.scheduler_factory = scheduler
        self.val_student = accuracy_metrics(num_classes, "student/")
        self.val_student_ece = calibration_error(num_classes)
        if teacher is not None:
            self.val_teacher = accuracy_metrics(num_classes, "teacher/")
            self.val_teacher_ece = calibration_error(num_classes)
            self.val_agreement = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    teacher: FrozenTeacher | CachedTeacher | None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def on_train_epoch_start(self) -> None:
        self.loss.start_epoch(self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, target, view_ids = batch  # view_ids: (sample index, epoch) per image, see kd.data.sampling
        if self.mixup is not None:  # once, here: the teacher and the student get the same mixed tensor
            key = (self.global_rank, self.current_epoch, batch_idx)
            images, target = self.mixup(images, target, self.num_classes, key)
        if self.channels_last:
            images = to_channels_last(images)
        stages = self.loss.feature_stages()
        teacher_logits, teacher_features = self.teacher_outputs(images, view_ids, stages.teacher)
        if stages.student:
            student_logits, student_features = self.student.forward_with_features(images, stages.student)
        else:
            student_logits, student_features = self.student_forward(images), {}
        loss = self.loss(student_logits, teacher_logits, target, Features(student_features, teacher_features))
        if not torch.isfinite(loss):
            self.stop_on_non_finite_loss(loss, batch_idx)
        batch_size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if len(self.loss.last_terms) > 1:
            self.log_dict({f"train/loss/{k}": v for k, v in self.loss.last_terms.items()}, batch_size=batch_size)
        return loss

    def teacher_outputs(
        self, images: torch.Tensor, view_ids: torch.Tensor, stages: tuple[int, ...]
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The teacher's logits (and feature maps of ``stages``) for this training batch. A cached teacher reads
        the logits stored for these views (and the mixup of this batch) instead of running the network."""
        if not self.loss.uses_teacher:
            return None, {}
        if isinstance(self.teacher, CachedTeacher):
            return self.teacher.lookup(view_ids, images.device), {}
        return self.teacher.forward_with_features(images, stages)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, target = batch
        if self.channels_last:
            images = to_channels_last(images)
        student_logits = self.student(images)
        self.val_student.update(student_logits, target)
        self.log_dict(self.val_student, prog_bar=True)
        self.val_student_ece.update(student_logits.softmax(dim=1), target)
        self.log("student/ece", self.val_student_ece)
        if self.teacher is not None:
            teacher_logits = self.teacher(images)
            self.val_teacher.update(teacher_logits, target)
            self.val_teacher_ece.update(teacher_logits.softmax(dim=1), target)
            self.log("teacher/ece", self.val_teacher_ece)
            self.val_agreement.update(student_logits, teacher_logits.argmax(dim=1))
            self.log_dict(self.val_teacher)
            self.log("agreement", self.val_agreement)

    test_step = validation_step

    def configure_optimizers(self):
        # The student and any trainable loss parts (feature adapters), never the teacher.
        optimizer = self.optimizer_factory(self, self.global_batch_size())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total_steps, steps_per_epoch=max(1, math.ceil(total_steps / epochs))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_batch_size(self) -> int | None:
        """Images per optimizer step: the per-device batch times devices times accumulated batches."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            return None
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers take the number of finished updates, i.e. the index of the next step.
        scheduler.step_update(num_updates=self.global_step)

    def stop_on_non_finite_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raised before the backward pass, so the weights and the last checkpoint are still the good ones."""
        terms = self.loss.last_terms or {"loss": loss}
        name, value = next(((k, v) for k, v in terms.items() if not torch.isfinite(v)), ("total", loss))
        raise NonFiniteError(
            f"the loss term {name} became {value.item()} at step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}), so the run stopped and kept its last good checkpoint; lower optim.lr, clip "
            "gradients (trainer.gradient_clip_val=1.0) or check the inputs"
        )

    def on_train_start(self) -> None:
        """The teacher runs beside the training wrapper (DDP), never inside it, on this process's device."""
        if self.teacher is None:
            return
        self.teacher.to(self.device)
        wrapped = self.trainer.strategy.model
        teacher_params = {id(p) for p in self.teacher.parameters()}
        if any(id(p) in teacher_params for p in wrapped.parameters()):
            raise RuntimeError("the teacher is inside the training wrapper; it must not be a registered submodule")
        log.info(
            "teacher on %s, outside %s (%d trainable tensors) and the optimizer, process %d of %d",
            self.device,
            type(wrapped).__name__,
            sum(1 for p in wrapped.parameters() if p.requires_grad),
            self.global_rank + 1,
            self.trainer.world_size,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint with NaN or infinite weights would replace the last good one: refuse to write it.
        broken = next(
            (k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()), None
        )
        if broken is not None:
            raise NonFiniteError(
                f"the student's weights became non-finite ({broken}) by step {self.global_step}, so the run stopped "
                "and kept its last good checkpoint; lower optim.lr or clip gradients (trainer.gradient_clip_val=1.0)"
            )
        if self.teacher is not None:
            checkpoint["teacher_fingerprint"] = self.teacher.start_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("teacher_fingerprint")
        if self.teacher is not None and saved and saved != self.teacher.start_fingerprint:
            raise KdError(
                "the checkpoint was distilled from another teacher (fingerprint "
                f"{saved[:12]} != {self.teacher.start_fingerprint[:12]}); resume with the same teacher"
            )
