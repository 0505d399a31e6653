"""How many optimizer steps a run will take, counted as Lightning counts them once it runs."""

from __future__ import annotations

import math

import lightning as L

from kd.data import ClassificationData


def planned_steps(trainer: L.Trainer, data: ClassificationData) -> tuple[int, int]:
    """(optimizer steps of the whole run, per epoch), counted as Lightning will count them once it runs."""
    batches = data.batches_per_epoch(trainer.world_size)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    by_epochs = per_epoch * max_epochs if max_epochs is not None and max_epochs >= 0 else None
    if max_steps is not None and max_steps >= 0:
        total = max_steps if by_epochs is None else min(max_steps, by_epochs)
    else:
        total = by_epochs if by_epochs is not None else per_epoch
    return total, per_epoch
