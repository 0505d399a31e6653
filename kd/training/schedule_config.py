"""A scheduler given the Lightning way or kd's way, as the ``lr_scheduler`` entry Lightning expects."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


def takes(factory: Callable, name: str) -> bool:
    """Whether ``factory`` accepts the keyword ``name`` (kd's schedules take the run's length, torch's do not)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def scheduler_config(
    factory: Callable[..., Any], optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> dict[str, Any]:
    """``factory(optimizer)``, also given ``total_steps`` and ``steps_per_epoch`` when it takes them (kd's
    ``warmup_cosine``), stepped after every optimizer step unless it returns a Lightning dict with its own
    ``interval``."""
    plan = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
    scheduler = factory(optimizer, **{key: value for key, value in plan.items() if takes(factory, key)})
    return {"interval": "step", **(scheduler if isinstance(scheduler, dict) else {"scheduler": scheduler})}
