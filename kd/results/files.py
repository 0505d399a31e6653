"""The one writer of a run's outcome: ``results.json`` when it finished, ``failure.json`` when a sweep job failed.

Both are written atomically (temporary file, then rename). Sweep summaries read these files and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kd.io import write_json_atomic
from kd.weights.names import model_record

log = logging.getLogger("kd")

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"


def choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group options this run was composed from (``teacher=resnet152_vd`` -> resnet152_vd)."""
    try:
        chosen = HydraConfig.get().runtime.choices
    except ValueError:  # composed without @hydra.main (tests): compose(..., return_hydra_config=True)
        chosen = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    return {key: str(value) for key, value in dict(chosen).items() if not key.startswith("hydra")}


def write_results(out: Path, cfg: DictConfig, task: str, **extra: Any) -> Path:
    """``results.json``: the task, the chosen teacher, student, loss and data, the seed, ``extra`` (metrics,
    fingerprints, timings) and the command-line overrides."""
    chosen = choices(cfg)
    with_teacher = task in ("distill", "eval", "cache_teacher") and OmegaConf.select(cfg, "teacher.arch") is not None
    results = {
        "task": task,
        **({"teacher": chosen.get("teacher")} if task in ("distill", "eval") else {}),
        "student": chosen.get("student"),
        # The real architectures and weights, whichever option named them (teacher=timm teacher.model=NAME).
        **({"teacher_model": model_record(cfg.teacher)} if with_teacher else {}),
        "student_model": model_record(cfg.get("student")),
        **({"loss": chosen.get("loss")} if task in ("distill", "train") else {}),
        "data": chosen.get("data"),
        "seed": cfg.seed,
        **extra,
        **({"published": OmegaConf.to_container(cfg.published)} if cfg.get("published") else {}),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    path = write_json_atomic(out / RESULTS_FILE, results, "results file")
    log.info("results written to %s", path)
    return path


def write_failure(out: Path, error: str, overrides: Sequence[str]) -> Path:
    """Record a failed job, never as a results.json: the summary lists it as failed with ``error``."""
    failure = {"status": "failed", "error": error, "overrides": list(overrides)}
    return write_json_atomic(Path(out) / FAILURE_FILE, failure, "failure record")
