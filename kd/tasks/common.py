"""What every task shares: building data, models, optimizer, trainer and loggers from the config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from kd.data import ClassificationData
from kd.errors import KdError
from kd.models import Classifier
from kd.results.callbacks import EpochLine
from kd.results.dashboards import add_model_tags
from kd.students.build import build_student
from kd.students.card import StudentCard
from kd.students.trained import trained_student
from kd.tasks.auto_weights import auto_weights
from kd.teachers.build import build_teacher
from kd.teachers.frozen import FrozenTeacher
from kd.training.optim import OptimizerRecipe
from kd.training.precision import device_type_of, hardware_name, trainer_precision
from kd.weights.sources import ObtainAuto, resolve

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
    if resolve(student_cfg.get("weights")).kind == "auto":
        data = data or build_data(cfg, cfg.student)
        path = auto_weights(cfg, data)(cfg.student, "student")
        student_cfg = OmegaConf.merge(cfg.student, {"weights": str(path)})
    return trained_student(student_cfg, data, lambda: build_data(cfg, cfg.student))


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
    given = cfg.trainer.get("precision", "32-true")
    device_type = device_type_of(cfg.trainer.get("accelerator"))
    chosen = trainer_precision(given, device_type)
    if str(given) == "auto" and chosen == "bf16-mixed":
        log.info("the student trains in bf16-mixed (%s; trainer.precision=32-true for float32)", hardware_name("cpu"))
    elif str(given) == "auto":
        why = "no native bf16 on this CPU" if device_type == "cpu" else "on a GPU, set bf16-mixed yourself"
        log.info("the student trains in float32, 32-true (trainer.precision=auto: %s)", why)
    return chosen


def logger_configs(cfg: DictConfig) -> list[DictConfig]:
    return [c for c in (cfg.get("logger") or {}).values() if c is not None]


def attach_loggers(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Build the configured loggers and hand them to ``trainer``: call it after the last check, before any work."""
    loggers = [instantiate(c) for c in logger_configs(cfg)]
    add_model_tags(loggers, cfg)  # teacher_model:convnext_tiny.fb_in22k_ft_in1k beside teacher:timm
    for logger in loggers:  # the whole resolved config, so every dashboard run says how it was made
        logger.log_hyperparams(resolved_config(cfg))
    trainer.loggers = loggers


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    run_keys = [key for key in cfg if key != "hydra"]  # hydra's own node is there only in composed tests
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True)


def validate(trainer: L.Trainer, module: L.LightningModule, data: ClassificationData) -> dict[str, float]:
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    return {key: float(value) for key, value in metrics.items()}
