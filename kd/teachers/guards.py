"""The teacher's guard during training, a Lightning callback: ``DistillationModule.configure_callbacks`` returns it,
so ``python run.py``, ``kd.distill`` and a user's own ``L.Trainer`` get the same refusals.

It keeps the teacher frozen and where it belongs: beside the training wrapper (DDP) and out of the optimizer when
training starts, unchanged (the same fingerprint) when the fit ends, and its fingerprint written into every
checkpoint and compared on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from kd.errors import KdError

log = logging.getLogger("kd")


def check_teacher(saved: str | None, current: str | None, path: str | Path | None) -> None:
    """The teacher of a resumed run must be the one the checkpoint at ``path`` was distilled from (``saved``: its
    ``teacher_fingerprint``; ``current``: this run's; either missing: nothing to compare)."""
    if saved and current and saved != current:
        raise KdError(
            f"checkpoint {path} was distilled from another teacher (fingerprint {saved[:12]}, this run's teacher "
            f"is {current[:12]}); resume with the teacher and teacher.weights the run started with"
        )


def teacher_of(pl_module: L.LightningModule) -> Any | None:
    """The frozen teacher beside the module (``DistillationModule.teacher``); None: nothing to guard."""
    return getattr(pl_module, "teacher", None)


class TeacherGuard(L.Callback):
    """Guards the module's ``teacher``. A checkpoint a task checked before any work (``check_resume``) is not
    checked again when Lightning loads it."""

    def __init__(self) -> None:
        self.checked: Path | None = None

    def check_resume(self, checkpoint: dict[str, Any], path: Path, teacher: Any | None) -> None:
        """The fingerprint check of ``on_load_checkpoint``, run early by a task on the checkpoint it will resume."""
        check_teacher(checkpoint.get("teacher_fingerprint"), teacher and teacher.start_fingerprint, path)
        self.checked = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The teacher runs beside the training wrapper (DDP), never inside it, on this process's device."""
        teacher = teacher_of(pl_module)
        if teacher is None:
            return
        teacher.to(pl_module.device)
        wrapped = trainer.strategy.model
        teacher_params = {id(p) for p in teacher.parameters()}
        if any(id(p) in teacher_params for p in wrapped.parameters()):
            raise KdError(
                "the teacher's parameters are registered inside the LightningModule, so they would be checkpointed and "
                "wrapped for training; keep the teacher out of the module's attributes (pass it as teacher=)"
            )
        trained = sum(id(p) in teacher_params for o in trainer.optimizers for g in o.param_groups for p in g["params"])
        if trained:
            raise KdError(
                f"the optimizer holds {trained} of the teacher's parameter tensors, but the teacher is frozen and "
                "never trained; build the optimizer from the student's parameters only (self.parameters())"
            )
        log.info(
            "teacher on %s, outside %s (%d trainable tensors) and the optimizer, process %d of %d",
            pl_module.device,
            type(wrapped).__name__,
            sum(1 for p in wrapped.parameters() if p.requires_grad),
            trainer.global_rank + 1,
            trainer.world_size,
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The fingerprint check also ends a fit in a user's own Trainer (kd's tasks record the end fingerprint)."""
        if (teacher := teacher_of(pl_module)) is not None:
            teacher.check_unchanged()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # At the checkpoint's top level, where kd has always written it and older checkpoints have it.
        if (teacher := teacher_of(pl_module)) is not None:
            checkpoint["teacher_fingerprint"] = teacher.start_fingerprint

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        teacher, path = teacher_of(pl_module), trainer.ckpt_path
        if teacher is None or (self.checked is not None and path and Path(path) == self.checked):
            return
        check_teacher(checkpoint.get("teacher_fingerprint"), teacher.start_fingerprint, path)
