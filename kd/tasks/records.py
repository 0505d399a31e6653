"""What a run's ``results.json`` says about the run itself: the chosen options, the real models, the seed, the
recipe's published figures and the command-line overrides; ``kd.results.files`` writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kd.io import MODEL_ROLES
from kd.results import files
from kd.tasks.models import model_spec
from kd.weights.names import model_record

# A task that trains on labels alone has no teacher to record.
TEACHER_TASKS = ("distill", "eval", "cache_teacher")


def choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group options this run was composed from (``teacher=resnet152_vd`` -> resnet152_vd)."""
    try:
        chosen = HydraConfig.get().runtime.choices
    except ValueError:  # composed without @hydra.main (tests): compose(..., return_hydra_config=True)
        chosen = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    return {key: str(value) for key, value in dict(chosen).items() if not key.startswith("hydra")}


def model_records(cfg: DictConfig, task: str) -> dict[str, dict[str, Any] | None]:
    """``{"teacher", "student"}``: the real architecture and weights of each model the task uses (None: none)."""
    roles = MODEL_ROLES if task in TEACHER_TASKS else ("student",)
    records: dict[str, dict[str, Any] | None] = {role: None for role in MODEL_ROLES}
    for role in roles:
        model_cfg = cfg.get(role)
        if model_cfg is not None and model_cfg.get("arch") is not None:
            records[role] = model_record(model_spec(model_cfg, role))
    return records


def write_results(
    out: Path, cfg: DictConfig, task: str, records: dict[str, dict[str, Any] | None] | None = None, **extra: Any
) -> Path:
    """``results.json``: the task, the chosen teacher, student, loss and data, the seed, ``extra`` (metrics,
    fingerprints, timings) and the command-line overrides. ``records``: ``model_records``, when already read."""
    chosen = choices(cfg)
    records = records if records is not None else model_records(cfg, task)
    results = {
        "task": task,
        **({"teacher": chosen.get("teacher")} if task in ("distill", "eval") else {}),
        "student": chosen.get("student"),
        # The real architectures and weights, whichever option named them (teacher=timm teacher.model=NAME).
        **({"teacher_model": records["teacher"]} if records.get("teacher") is not None else {}),
        "student_model": records.get("student"),
        **({"loss": chosen.get("loss")} if task in ("distill", "train") else {}),
        "data": chosen.get("data"),
        "seed": cfg.seed,
        **extra,
        **({"published": OmegaConf.to_container(cfg.published)} if cfg.get("published") else {}),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    return files.write_results(out, results)
