"""Runs the chosen task and turns user errors into one line on stderr and exit code 2.

In a multirun, a failing job is recorded in its folder's failure.json instead, and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.errors import KdError
from kd.launch.library_warnings import silence_known_library_warnings
from kd.results.dashboards import finish_dashboards
from kd.results.files import FAILURE_FILE, write_failure
from kd.training.preemption import Preempted

log = logging.getLogger("kd")
PREEMPTED_EXIT = 128 + 15  # as a process stopped by SIGTERM reports itself


def user_error(error: BaseException) -> KdError | None:
    """The KdError behind ``error``, if any (hydra's instantiate wraps exceptions of constructors)."""
    while error is not None:
        if isinstance(error, KdError):
            return error
        error = error.__cause__ or error.__context__
    return None


def route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own console handler; Hydra's root handlers already print (and file) its records."""
    import lightning.pytorch  # noqa: F401  (its import adds the handlers: they must exist before we clear them)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(drop_advertisements)


def drop_advertisements(record: logging.LogRecord) -> bool:
    """Lightning logs tips for its commercial services at every fit; they are not about the run."""
    return not str(record.msg).startswith("💡 Tip")


def run_task(cfg: DictConfig) -> float | None:
    """Returns the final student top-1, so Hydra sweepers can optimize it."""
    silence_known_library_warnings()
    route_lightning_logs_through_hydra()
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep:
        (Path(cfg.paths.output_dir) / FAILURE_FILE).unlink(missing_ok=True)  # from an earlier attempt
    try:
        results = instantiate(cfg.task)(cfg)
    except Preempted as stop:  # a signal stopped it after a whole step: how to resume, and a signal's exit code
        finish_dashboards(None)
        log.warning("%s", stop)
        sys.exit(PREEMPTED_EXIT)
    except Exception as error:
        finish_dashboards(None)  # the dashboard run ends marked failed, never left open
        if in_sweep:
            record_failed_job(cfg, error)
            return None
        problem = user_error(error)
        if problem is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("user error", exc_info=error)
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    finish_dashboards(results)
    return results["metrics"].get("student/top1")


def record_failed_job(cfg: DictConfig, error: Exception) -> None:
    """One job of a multirun failed: log it and write failure.json, so the sweep goes on and its summary lists it."""
    problem = user_error(error)
    message = str(problem) if problem is not None else f"{type(error).__name__}: {error}"
    log.error("job failed: %s", message, exc_info=problem is None)  # a bug: its traceback goes to the log
    write_failure(Path(cfg.paths.output_dir), message, HydraConfig.get().overrides.task)
