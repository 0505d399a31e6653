"""Per-step learning rate: linear warmup from 0, then cosine decay to ``min_lr`` (timm's scheduler)."""

from __future__ import annotations

import logging

from timm.scheduler import CosineLRScheduler
from torch.optim import Optimizer

from kd.errors import KdError

log = logging.getLogger("kd")

# A warmup that would fill a run it was not written for (a recipe run for one epoch) shrinks to this share of it.
FITTED_WARMUP_SHARE = 0.1


def fitted_warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int, fit_to_run: bool) -> int:
    """The warmup in steps. A warmup as long as the run is refused when the user set it; a default
    (``fit_to_run``) shrinks to a tenth of the run instead, and the log says so."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_steps < total_steps:
        return warmup_steps
    if not fit_to_run:
        raise KdError(
            f"sched.warmup_epochs={warmup_epochs} covers the whole run ({warmup_steps} of {total_steps}"
            " steps); use fewer warmup epochs or train longer"
        )
    fitted = int(total_steps * FITTED_WARMUP_SHARE)
    log.info(
        "sched.warmup_epochs=%s (a default) would cover the whole run of %d steps: warming up for %d steps instead",
        warmup_epochs, total_steps, fitted,
    )  # fmt: skip
    return fitted


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    fit_to_run: bool = False,
) -> CosineLRScheduler:
    """LR at optimizer step k (0-based), with W warmup steps and T steps in all:
    ``base * k / W`` for k < W, else ``min_lr + (base - min_lr) * (1 + cos(pi * (k - W) / (T - W))) / 2``.
    Step it with ``scheduler.step_update(num_updates=k)`` before step k runs. ``fit_to_run``: the warmup is a
    default, not the user's, and shrinks to fit a run it would cover (see ``fitted_warmup_steps``).
    """
    warmup_steps = fitted_warmup_steps(warmup_epochs, steps_per_epoch, total_steps, fit_to_run)
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,  # the cosine starts after warmup and spans the remaining steps
        t_in_epochs=False,
    )
