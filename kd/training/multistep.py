"""Step decay of the learning rate at milestone epochs (CRD's and mdistiller's CIFAR-100 schedule), after an
optional linear warmup: ``sched=multistep``.

Written on timm's ``Scheduler`` base (state dict, ``step_update``) like ``warmup_cosine``, but not on timm's
``MultiStepLRScheduler``: that one applies milestone ``m`` at index ``m - 1`` (its long-standing convention),
one step or epoch earlier than the papers, whose training scripts decay from epoch ``m`` (0-based) on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from kd.errors import KdError
from kd.training.schedule import fitted_warmup_steps

log = logging.getLogger("kd")


class WarmupMultiStep(Scheduler):
    """The LR of optimizer step ``k`` (0-based) in epoch ``e = k // steps_per_epoch``, for a base LR ``b``:

    - per step: ``b * k / W`` for ``k < W`` (``W`` = warmup epochs in steps), else ``b * gamma ** n(e)``;
    - per epoch: ``b * min(1, (e + 1) / warmup_epochs)`` for ``e < warmup_epochs`` (as DKD's loss warmup:
      epoch 0 already learns), else ``b * gamma ** n(e)``; constant within an epoch;

    with ``n(e)`` the number of milestones ``<= e``: the LR drops at the first step of each milestone epoch.
    Step it with ``scheduler.step_update(num_updates=k)`` before step k runs.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        per_step: bool = True,
    ) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.per_step = bool(per_step)
        self.warmup_steps = round(self.warmup_epochs * self.steps_per_epoch)
        self.update_groups(self._get_lr(0))  # the LR of step 0, before any step_update

    def factor(self, step: int) -> float:
        """The multiple of the base LR in force at optimizer step ``step``."""
        epoch = step // self.steps_per_epoch
        if self.per_step and step < self.warmup_steps:
            return step / self.warmup_steps
        if not self.per_step and epoch < self.warmup_epochs:
            return min(1.0, (epoch + 1) / self.warmup_epochs)
        return self.gamma ** sum(1 for milestone in self.milestones if milestone <= epoch)

    def _get_lr(self, t: int) -> list[float]:
        return [base * self.factor(t) for base in self.base_values]


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (150, 180, 210),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    per_step: bool = True,
    fit_to_run: bool = False,
) -> WarmupMultiStep:
    """``sched=multistep``: checks its numbers against the run (``total_steps`` optimizer steps,
    ``steps_per_epoch`` per epoch) and builds the schedule; see ``WarmupMultiStep`` for the formula.
    ``fit_to_run``: the milestones and warmup are defaults (a recipe's), not the user's: milestones past the run
    are dropped and a warmup as long as the run shrinks, each said in the log, instead of being refused."""
    milestones = list(milestones) if milestones is not None else []
    epochs = math.ceil(total_steps / max(1, steps_per_epoch))
    if fit_to_run and milestones and isinstance(milestones[-1], int) and milestones[-1] >= epochs:
        log.info("sched.milestones=%s (a default) reach past the run's %d epochs: dropping those", milestones, epochs)
        milestones = [m for m in milestones if not isinstance(m, int) or m < epochs]
    if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in milestones):
        raise KdError(f"sched.milestones={milestones} must be whole epochs of 1 or more, e.g. [150, 180, 210]")
    if any(later <= earlier for earlier, later in zip(milestones, milestones[1:], strict=False)):
        raise KdError(f"sched.milestones={milestones} must increase strictly, e.g. [150, 180, 210]")
    if milestones and milestones[-1] >= epochs:
        raise KdError(
            f"sched.milestones={milestones} reaches epoch {milestones[-1]}, but the run has {epochs} epochs "
            f"(0 to {epochs - 1}); give milestones inside the run or train longer"
        )
    if not 0 < gamma <= 1:
        raise KdError(f"sched.gamma={gamma} must lie in (0, 1]: the LR is multiplied by it at each milestone")
    if warmup_epochs < 0:
        raise KdError(f"sched.warmup_epochs={warmup_epochs} is negative; use 0 for no warmup")
    if fit_to_run and round(warmup_epochs * steps_per_epoch) >= total_steps > 0:
        warmup_epochs = fitted_warmup_steps(warmup_epochs, steps_per_epoch, total_steps, True) / steps_per_epoch
    if milestones and warmup_epochs > milestones[0]:
        raise KdError(
            f"sched.warmup_epochs={warmup_epochs} outlasts the first milestone (epoch {milestones[0]}); "
            "warm up for fewer epochs than that"
        )
    if round(warmup_epochs * steps_per_epoch) >= total_steps:
        raise KdError(
            f"sched.warmup_epochs={warmup_epochs} covers the whole run ({total_steps} steps); "
            "use fewer warmup epochs or train longer"
        )
    return WarmupMultiStep(optimizer, milestones, gamma, steps_per_epoch, warmup_epochs, per_step)
