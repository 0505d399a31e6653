"""Runs the chosen task and turns user errors into one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import os
import sys

from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError

log = logging.getLogger("kd")


def user_error(error: BaseException) -> KdError | None:
    """The KdError behind ``error``, if any (hydra's instantiate wraps exceptions of constructors)."""
    while error is not None:
        if isinstance(error, KdError):
            return error
        error = error.__cause__ or error.__context__
    return None


def route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own console handler; Hydra's root handlers already print (and file) its records."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def run_task(cfg: DictConfig) -> float | None:
    """Returns the final student top-1, so Hydra sweepers can optimize it."""
    route_lightning_logs_through_hydra()
    try:
        results = instantiate(cfg.task)(cfg)
    except Exception as error:
        problem = user_error(error)
        if problem is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("user error", exc_info=error)
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    return results["metrics"].get("student/top1")
