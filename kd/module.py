"""The LightningModule: a trainable student, a frozen teacher beside it, a loss that compares them."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd.data.batches import teacher_images, unpack_batch
from kd.data.mixup import BatchMixup
from kd.errors import KdError, NonFiniteError
from kd.losses.base import DistillationLoss, Features
from kd.models import Classifier
from kd.students.ema import student_ema
from kd.students.fast import FastPath, to_channels_last
from kd.teachers.cache import CachedTeacher
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.guards import TeacherGuard
from kd.teachers.pair import check_same_classes, checked_models
from kd.training.guards import FiniteCheckpoints
from kd.training.optim import OptimizerFactory, OptimizerRecipe
from kd.training.schedule_config import scheduler_config

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

    ``student`` and ``teacher`` may be plain ``nn.Module``s: they are wrapped with ``kd.as_classifier`` (timm
    models normalize as their ``pretrained_cfg`` says; wrap others yourself), and a teacher that is not a
    ``FrozenTeacher`` yet is frozen in place. ``num_classes`` defaults to the student's class count.

    ``optimizer`` is an ``OptimizerRecipe``, a callable that takes the parameters to train (a ``torch.optim``
    partial, Lightning's way) or a ready optimizer; leave it None only when overriding ``configure_optimizers``.
    ``scheduler`` is kd's schedule factory (``optimizer, total_steps, steps_per_epoch``) or any callable that takes
    the optimizer; it is stepped after every optimizer step (return a Lightning scheduler dict to choose another
    interval). ``mixup`` (a ``BatchMixup``) mixes each training batch once, so teacher and student see the same
    tensor. Batches are ``(images, labels)``; kd's data modules add ``view_ids``, which only the teacher-output
    cache needs.

    ``channels_last`` (true, false or auto: conv nets only) keeps the student's weights and inputs in NHWC
    memory order, and ``compile`` runs its forward pass through ``torch.compile`` (see ``kd.students.fast``);
    ``fast`` (a ``FastPath`` a task has already checked) replaces both.
    ``ema_decay`` (None: off) keeps ``student_ema``, a moving average of the student's weights updated after
    every optimizer step, validated beside the student as ``student_ema/*`` and checkpointed (``kd.students.ema``).

    The module holds the step, validation and the optimizer; the guards of the teacher (``kd.teachers.guards``) and
    of the checkpoints (``kd.training.guards``) are Lightning callbacks it adds to any Trainer
    (``configure_callbacks``).
    """

    def __init__(
        self,
        student: Classifier | nn.Module,
        loss: DistillationLoss,
        optimizer: OptimizerRecipe | OptimizerFactory | torch.optim.Optimizer | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        teacher: FrozenTeacher | CachedTeacher | nn.Module | None = None,
        mixup: BatchMixup | None = None,
        channels_last: bool | str | None = "auto",
        compile: bool = False,
        ema_decay: float | None = None,
        fast: FastPath | None = None,
    ) -> None:
        super().__init__()
        if teacher is None and loss.uses_teacher:
            raise KdError(
                f"loss {type(loss).__name__} needs a teacher, but this task trains on labels only; use loss=ce"
            )
        student, teacher, num_classes = checked_models(student, teacher, num_classes)
        # A teacher without a classifier (timm's num_classes=0) gives features: it teaches feature losses only.
        self.embedding_teacher = teacher is not None and bool(getattr(teacher.live, "embedding", False))
        if self.embedding_teacher and loss.uses_teacher_logits:
            raise KdError(
                f"loss {type(loss).__name__} compares class predictions, but the teacher has no classifier "
                "(num_classes=0) and gives features only; use loss=feature_kd or another feature loss"
            )
        self.student = student
        self.loss = loss
        self.__dict__["teacher"] = teacher  # bypasses nn.Module registration, see the class docstring
        loss.bind(student, teacher)
        if fast is None:  # no task checked them before any work (kd.tasks.train passes its FastPath)
            fast = FastPath.checked(channels_last, compile, loss.feature_stages().student)
        self.channels_last = fast.channels_last_for(student)
        if self.channels_last:  # same values, another memory order; exported weights are written contiguous
            student.to(memory_format=torch.channels_last)
        # The compiled forward shares the student's parameters; kept out of the module tree (no second copy
        # of the weights in state_dict()).
        self.__dict__["student_forward"] = torch.compile(student) if fast.compile else student
        self.num_classes = num_classes
        self.bound_samples: int | None = None  # the training-set size the loss was sized for (bind_data)
        # After channels_last: the average keeps the student's memory order. Registered (checkpointed), never trained.
        self.student_ema = student_ema(student, ema_decay) if ema_decay is not None else None
        self.mixup = mixup
        is_ready = optimizer is None or isinstance(optimizer, OptimizerRecipe | torch.optim.Optimizer)
        self.optimizer_factory = optimizer if is_ready else OptimizerRecipe(optimizer)
        self.scheduler_factory = scheduler
        self.val_student = accuracy_metrics(num_classes, "student/")
        self.val_student_ece = calibration_error(num_classes)
        if teacher is not None:
            self.val_teacher = accuracy_metrics(num_classes, "teacher/")
            self.val_teacher_ece = calibration_error(num_classes)
            self.val_agreement = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if self.student_ema is not None:
            self.val_student_ema = accuracy_metrics(num_classes, "student_ema/")

    teacher: FrozenTeacher | CachedTeacher | None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def setup(self, stage: str) -> None:
        # After the datamodule's setup, before a checkpoint is restored and the optimizer built: losses that keep
        # one entry per training image (CRD's memory) size it here.
        train_set = getattr(self.trainer.datamodule, "train_set", None) if stage == "fit" else None
        if train_set is not None:
            self.bind_data(len(train_set))

    def bind_data(self, num_samples: int) -> None:
        """The loss's ``bind_data``, once per training-set size: ``setup`` calls it, and kd's tasks earlier, before a
        checkpoint's ``loss.*`` shapes are compared with the module's."""
        if num_samples != self.bound_samples:
            self.loss.bind_data(num_samples)
            self.bound_samples = num_samples

    def on_train_epoch_start(self) -> None:
        self.loss.start_epoch(self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        # view_ids: (sample index, epoch) per image (kd.data.sampling), None in plain (images, labels) batches
        images, target, view_ids = unpack_batch(
            batch, self.student.preprocessing.in_chans, self.num_classes, not batch_idx
        )
        # teacher.view=fixed / independent: the teacher's own images of the same samples; else the student's tensor.
        own = teacher_images(batch, images) if self.loss.uses_teacher else None
        if self.mixup is not None:  # once, here: the teacher and the student get the same mixed tensor
            key = (self.global_rank, self.current_epoch, batch_idx)
            if own is not None:  # the same key: the same pairs, weights and boxes on the teacher's images
                own, _ = self.mixup(own, target, self.num_classes, key)
            images, target = self.mixup(images, target, self.num_classes, key)
        if self.channels_last:
            images = to_channels_last(images)
        stages = self.loss.feature_stages()
        teacher_input = images if own is None else own
        teacher_logits, teacher_features = self.teacher_outputs(teacher_input, view_ids, stages.teacher)
        if stages.student:
            student_logits, student_features = self.student.forward_with_features(images, stages.student)
        else:
            student_logits, student_features = self.student_forward(images), {}
        if not self.embedding_teacher:
            check_same_classes(student_logits, teacher_logits)
        indices = view_ids[:, 0] if view_ids is not None else None  # plain (images, labels) batches carry none
        features = Features(student_features, teacher_features, indices=indices)
        loss = self.loss(student_logits, teacher_logits, target, features)
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
            if view_ids is None:
                raise KdError(
                    "the teacher-output cache looks the teacher's outputs up by each image's view id, but the training "
                    "batches are (images, labels) without view ids; train on a kd data module or without the cache"
                )
            return self.teacher.lookup(view_ids, images.device), {}
        return self.teacher.forward_with_features(images, stages)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        in_chans = self.student.preprocessing.in_chans
        images, target, _ = unpack_batch(batch, in_chans, self.num_classes, check_values=not batch_idx, soft=False)
        if self.channels_last:
            images = to_channels_last(images)
        student_logits = self.student(images)
        self.val_student.update(student_logits, target)
        self.log_dict(self.val_student, prog_bar=True)
        self.val_student_ece.update(student_logits.softmax(dim=1), target)
        self.log("student/ece", self.val_student_ece)
        if self.student_ema is not None:
            self.val_student_ema.update(self.student_ema.module(images), target)
            self.log_dict(self.val_student_ema)
        if self.teacher is not None and not self.embedding_teacher:  # an embedding teacher predicts no class
            teacher_logits = self.teacher(images)
            check_same_classes(student_logits, teacher_logits)
            self.val_teacher.update(teacher_logits, target)
            self.val_teacher_ece.update(teacher_logits.softmax(dim=1), target)
            self.log("teacher/ece", self.val_teacher_ece)
            self.val_agreement.update(student_logits, teacher_logits.argmax(dim=1))
            self.log_dict(self.val_teacher)
            self.log("agreement", self.val_agreement)

    test_step = validation_step

    def configure_optimizers(self):
        # The student and any trainable loss parts (feature adapters), never the teacher.
        if self.optimizer_factory is None:
            raise KdError(
                "DistillationModule got no optimizer; pass optimizer=functools.partial(torch.optim.SGD, lr=0.1) "
                "(any callable taking the parameters) or override configure_optimizers"
            )
        if isinstance(self.optimizer_factory, torch.optim.Optimizer):
            optimizer = self.optimizer_factory
        else:
            optimizer = self.optimizer_factory(self, self.global_batch_size())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, math.ceil(total_steps / epochs))
        return {
            "optimizer": optimizer,
            "lr_scheduler": scheduler_config(self.scheduler_factory, optimizer, total_steps, steps_per_epoch),
        }

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.student_ema is not None:  # global_step counts this step only after the hook: + 1 (timm's num_updates)
            self.student_ema.update(self.student, step=self.global_step + 1)

    def global_batch_size(self) -> int | None:
        """Images per optimizer step: the per-device batch times devices times accumulated batches."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            return None
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers take the number of finished updates, i.e. the index of the next step.
        if hasattr(scheduler, "step_update"):
            scheduler.step_update(num_updates=self.global_step)
        else:  # a torch.optim.lr_scheduler, Lightning's way
            super().lr_scheduler_step(scheduler, metric)

    def configure_callbacks(self) -> list[L.Callback]:
        """The guards of the teacher and of the checkpoints, and the LR of every step for the loggers, also in a
        user's own Trainer. One the Trainer already has is kept (``python run.py`` configures them itself, and
        Lightning's ``LearningRateMonitor`` logs as often as ``trainer.log_every_n_steps`` says)."""
        trainer = self.trainer
        wanted = [TeacherGuard(), FiniteCheckpoints()]
        if trainer.loggers:
            wanted.append(LearningRateMonitor(logging_interval="step"))
        return [c for c in wanted if not any(isinstance(present, type(c)) for present in trainer.callbacks)]

    def stop_on_non_finite_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raised before the backward pass, so the weights and the last checkpoint are still the good ones."""
        terms = self.loss.last_terms or {"loss": loss}
        name, value = next(((k, v) for k, v in terms.items() if not torch.isfinite(v)), ("total", loss))
        raise NonFiniteError(
            f"the loss term {name} became {value.item()} at step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}), so the run stopped and kept its last good checkpoint; lower optim.lr, clip "
            "gradients (trainer.gradient_clip_val=1.0) or check the inputs"
        )
