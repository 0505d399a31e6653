"""What every task shares: building data, models, optimizer, trainer and loggers from the config."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from kd.data import ClassificationData
from kd.errors import KdError
from kd.io import MODEL_ROLES
from kd.models import Classifier
from kd.results.callbacks import EpochLine
from kd.results.dashboards import add_model_tags, sweep_group
from kd.students.card import StudentCard
from kd.students.onnx_student import onnx_student
from kd.students.trained import trained_student
from kd.tasks.auto_weights import auto_weights
from kd.tasks.models import ObtainAuto, build_student, build_teacher, model_spec
from kd.teachers.frozen import FrozenTeacher
from kd.training.optim import OptimizerRecipe
from kd.training.precision import device_type_of, hardware_name, trainer_precision
from kd.training.schedule_config import takes
from kd.weights.sources import resolve

log = logging.getLogger("kd")


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise KdError(
            f"output folder {path} cannot be written ({error.strerror}); choose another with hydra.run.dir=DIR"
        ) from None
    return path


def build_data(cfg: DictConfig, student_cfg: DictConfig) -> ClassificationData:
    """Instantiate the data module; image size, interpolation and crop left null follow the student."""
    data_cfg = cfg.data
    follow = [key for key in ("image_size", "interpolation", "crop_pct") if key in data_cfg and data_cfg[key] is None]
    overrides: dict[str, Any] = {}
    if follow:
        preprocessing = instantiate(student_cfg.arch).preprocessing()
        student_view = {
            "image_size": preprocessing.input_size[-1],
            "interpolation": preprocessing.interpolation,
            "crop_pct": preprocessing.crop_pct,
        }
        overrides = {key: student_view[key] for key in follow}
    if data_cfg.get("batch_size", 1) < 1:
        raise KdError(f"data.batch_size={data_cfg.batch_size} must be at least 1")
    data = instantiate(data_cfg, **overrides)
    data.prepare_data()
    data.setup("fit")
    return data


def build_models(
    cfg: DictConfig, num_classes: int, obtain_auto: ObtainAuto | None, with_teacher: bool
) -> tuple[FrozenTeacher | None, Classifier]:
    """Models whose weights are given (a file, a tag, none) are loaded first, so a bad file stops the run
    before ``weights: auto`` spends minutes training the other model."""
    builders = {
        "teacher": lambda: build_teacher(cfg, num_classes, obtain_auto),
        "student": lambda: build_student(cfg.student, num_classes, obtain_auto),
    }
    roles = ("teacher", "student") if with_teacher else ("student",)
    auto_last = sorted(roles, key=lambda role: resolve(cfg[role].get("weights")).kind == "auto")
    built = {role: builders[role]() for role in auto_last}
    return built.get("teacher"), built["student"]


def trained_student_of(cfg: DictConfig, data: ClassificationData | None = None) -> tuple[Classifier, StudentCard]:
    """``cfg.student`` as eval, predict and export use it: its weights as they are, with its card. Weights
    ``auto`` are trained (or found in the cache) on the run's data first."""
    student_cfg = cfg.student
    if str(student_cfg.get("weights")).endswith(".onnx"):  # an exported student, run by ONNX Runtime
        return onnx_student(student_cfg.weights, data)
    if resolve(student_cfg.get("weights")).kind == "auto":
        data = data or build_data(cfg, cfg.student)
        path = auto_weights(cfg, data)(cfg.student, "student")
        student_cfg = OmegaConf.merge(cfg.student, {"weights": str(path)})
    return trained_student(model_spec(student_cfg, "student"), data, lambda: build_data(cfg, cfg.student))


def user_set_keys(cfg: DictConfig) -> set[str]:
    """The config keys the user set (``python run.py KEY=VALUE``, ``kd.distill`` keywords), without a leading
    ``+``/``~``; what a recipe or a default set is not among them."""
    overrides = OmegaConf.select(cfg, "hydra.overrides.task")  # a composed config (tests, kd.distill)
    if overrides is None and HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
    return {str(override).split("=", 1)[0].lstrip("+~") for override in overrides or []}


def schedule_for(cfg: DictConfig) -> Callable[..., Any] | None:
    """``cfg.sched`` as a factory. Warmup and milestones the user did not set fit themselves to the run's length
    (``fit_to_run``) instead of refusing it: a recipe's 5 warmup epochs in a 1-epoch smoke test."""
    if not cfg.get("sched"):
        return None
    factory = instantiate(cfg.sched)
    user_set = user_set_keys(cfg) & {"sched.warmup_epochs", "sched.milestones"}
    if not user_set and takes(factory, "fit_to_run"):
        return partial(factory, fit_to_run=True)
    return factory


def optimizer_factory(cfg: DictConfig) -> OptimizerRecipe:
    if cfg.optim.lr <= 0:
        raise KdError(f"optim.lr={cfg.optim.lr} must be positive")
    settings = OmegaConf.to_container(cfg.optim, resolve=True)
    # kd's own Bag of Tricks keys (see conf/optim/sgd.yaml); the rest is the torch optimizer's.
    no_bias_decay = bool(settings.pop("no_bias_decay", False))
    lr_batch_size = settings.pop("lr_batch_size", None)
    return OptimizerRecipe(instantiate(settings), no_bias_decay=no_bias_decay, lr_batch_size=lr_batch_size)


def build_trainer(cfg: DictConfig, out: Path, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = run_precision(cfg)
    interactive = sys.stdout.isatty()
    if trainer_cfg.get("enable_progress_bar") is None:
        trainer_cfg["enable_progress_bar"] = interactive
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not logger_configs(cfg):  # logger=none: nothing to record the LR to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not trainer_cfg["enable_progress_bar"]:
        callbacks.append(EpochLine())
    # No logger yet: a logger writes files (csv/, wandb/) when it is built, so attach_loggers adds them once
    # every check has passed, and a refused run leaves only what Hydra writes.
    return instantiate(
        trainer_cfg, default_root_dir=str(out), callbacks=callbacks + list(extra_callbacks), logger=False
    )


def run_precision(cfg: DictConfig) -> str | int:
    """``trainer.precision``, with ``auto`` resolved for the run's device (``kd.training.precision``), said once."""
    given = cfg.trainer.get("precision", "auto")
    device_type = device_type_of(cfg.trainer.get("accelerator"))
    chosen = trainer_precision(given, device_type)
    if str(given) == "auto" and chosen == "bf16-mixed":
        log.info(
            "the student trains in bf16-mixed (%s; trainer.precision=32-true for float32)", hardware_name(device_type)
        )
    elif str(given) == "auto":
        log.info("the student trains in float32, 32-true (trainer.precision=auto: no native bf16 on this %s)",
                 "GPU" if device_type == "cuda" else device_type.upper())  # fmt: skip
    return chosen


def planned_trainer(cfg: DictConfig) -> L.Trainer:
    """A Trainer built only to count what ``cfg.trainer`` plans: processes, epochs and steps."""
    keys = (
        "accelerator", "strategy", "devices", "num_nodes",
        "max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches",
    )  # fmt: skip
    settings = {key: cfg.trainer[key] for key in keys if cfg.trainer.get(key) is not None}
    return L.Trainer(**settings, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def logger_configs(cfg: DictConfig) -> list[DictConfig]:
    return [c for c in (cfg.get("logger") or {}).values() if c is not None]


# The config groups a wandb run is tagged with, so dashboards can filter and group by them.
TAGGED_CHOICES = ("teacher", "student", "loss", "data")


def job_settings(logger_cfg: DictConfig) -> dict[str, Any]:
    """What ``kd.results.dashboards.wandb_logger`` leaves null and the Hydra job says: a sweep's group (its
    folder), the run's name (its overrides) and tags (its config-group choices)."""
    if not str(logger_cfg.get("_target_", "")).endswith(".wandb_logger") or not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    settings: dict[str, Any] = {}
    if logger_cfg.get("group") is None and hydra.mode == RunMode.MULTIRUN:
        settings["group"] = sweep_group(hydra.sweep.dir)
    if logger_cfg.get("name") is None:
        settings["name"] = hydra.job.override_dirname or None
    if logger_cfg.get("tags") is None:
        chosen = dict(hydra.runtime.choices)
        roles = [r for r in TAGGED_CHOICES if not (r == "teacher" and chosen.get("task") == "train")]
        settings["tags"] = [f"{role}:{chosen[role]}" for role in roles if chosen.get(role)]
    return settings


def model_tags(records: dict[str, dict[str, Any] | None]) -> list[str]:
    """``teacher_model:convnext_tiny.fb_in22k_ft_in1k`` beside ``teacher:timm``: the real models by name."""
    return [f"{role}_model:{record['name']}" for role in MODEL_ROLES if (record := records.get(role))]


def attach_loggers(cfg: DictConfig, trainer: L.Trainer, records: dict[str, dict[str, Any] | None]) -> None:
    """Build the configured loggers and hand them to ``trainer``: call it after the last check, before any work.
    ``records``: the run's models (``kd.tasks.records.model_records``), for the dashboards' tags."""
    loggers = [instantiate(c, **job_settings(c)) for c in logger_configs(cfg)]
    add_model_tags(loggers, model_tags(records))
    for logger in loggers:  # the whole resolved config, so every dashboard run says how it was made
        logger.log_hyperparams(resolved_config(cfg))
    trainer.loggers = loggers


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    run_keys = [key for key in cfg if key != "hydra"]  # hydra's own node is there only in composed tests
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True)


def validate(trainer: L.Trainer, module: L.LightningModule, data: ClassificationData) -> dict[str, float]:
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    return {key: float(value) for key, value in metrics.items()}
