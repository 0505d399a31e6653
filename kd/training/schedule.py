"""Per-step learning rate: linear warmup from 0, then cosine decay to ``min_lr`` (timm's scheduler)."""

from __future__ import annotations

from timm.scheduler import CosineLRScheduler
from torch.optim import Optimizer

from kd.errors import KdError


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, min_lr: float = 0.0
) -> CosineLRScheduler:
    """LR at optimizer step k (0-based), with W warmup steps and T steps in all:
    ``base * k / W`` for k < W, else ``min_lr + (base - min_lr) * (1 + cos(pi * (k - W) / (T - W))) / 2``.
    Step it with ``scheduler.step_update(num_updates=k)`` before step k runs.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps:
        raise KdError(
            f"sched.warmup_epochs={warmup_epochs} covers the whole run ({warmup_steps} of {total_steps}"
            " steps); use fewer warmup epochs or train longer"
        )
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,  # the cosine starts after warmup and spans the remaining steps
        t_in_epochs=False,
    )
