"""What every task shares: building data, models, trainer and loggers from the config; results."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from kd.callbacks import EpochLine
from kd.data import ClassificationData
from kd.errors import KdError
from kd.io import write_json_atomic
from kd.models import Classifier
from kd.models.build import ObtainWeights, build_classifier
from kd.optim import OptimizerRecipe
from kd.teachers import FrozenTeacher

log = logging.getLogger("kd")


def choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group options this run was composed from (``teacher=resnet152_vd`` -> resnet152_vd)."""
    try:
        chosen = HydraConfig.get().runtime.choices
    except ValueError:  # composed without @hydra.main (tests): compose(..., return_hydra_config=True)
        chosen = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    return {key: str(value) for key, value in dict(chosen).items() if not key.startswith("hydra")}


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
    from kd.models.build import instantiate_arch

    data_cfg = cfg.data
    follow = [key for key in ("image_size", "interpolation", "crop_pct") if key in data_cfg and data_cfg[key] is None]
    overrides: dict[str, Any] = {}
    if follow:
        preprocessing = instantiate_arch(student_cfg).preprocessing()
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


def has_teacher(cfg: DictConfig) -> bool:
    """False when the run was told to go without one (``~teacher`` on the command line)."""
    return cfg.get("teacher") is not None and cfg.teacher.get("arch") is not None


def build_teacher(cfg: DictConfig, num_classes: int, obtain_auto: ObtainWeights | None) -> FrozenTeacher:
    if not has_teacher(cfg):
        raise KdError("this task needs a teacher but ~teacher removed it; choose one with teacher=NAME")
    model = build_classifier(cfg.teacher, num_classes, "teacher", obtain_auto)
    return FrozenTeacher(
        model,
        bn_train_mode=bool(cfg.teacher.get("bn_train_mode", False)),
        channels_last=bool(cfg.teacher.get("channels_last", True)),
        compile=bool(cfg.teacher.get("compile", False)),
    )


def build_student(cfg: DictConfig, num_classes: int, obtain_auto: ObtainWeights | None) -> Classifier:
    return build_classifier(cfg.student, num_classes, "student", obtain_auto)


def build_models(
    cfg: DictConfig, num_classes: int, obtain_auto: ObtainWeights | None, with_teacher: bool
) -> tuple[FrozenTeacher | None, Classifier]:
    """Models whose weights are given (a file, a tag, none) are loaded first, so a bad file stops the run
    before ``weights: auto`` spends minutes training the other model."""
    roles = ("teacher", "student") if with_teacher else ("student",)
    built: dict[str, Any] = {}
    for role in sorted(roles, key=lambda r: str(cfg[r].get("weights")) == "auto"):
        build = build_teacher if role == "teacher" else build_student
        built[role] = build(cfg, num_classes, obtain_auto)
    teacher = built.get("teacher")
    if teacher is not None and str(cfg.teacher.get("weights")) in ("None", "", "none", "null"):
        log.warning(
            "teacher %s has no weights (teacher.weights=none): a random teacher has nothing to teach, "
            "which only makes sense for smoke tests and benchmarks",
            cfg.teacher.get("name"),
        )
    return teacher, built["student"]


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


def logger_configs(cfg: DictConfig) -> list[DictConfig]:
    return [c for c in (cfg.get("logger") or {}).values() if c is not None]


def attach_loggers(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Build the configured loggers and hand them to ``trainer``: call it after the last check, before any work."""
    loggers = [instantiate(c) for c in logger_configs(cfg)]
    for logger in loggers:  # the whole resolved config, so every dashboard run says how it was made
        logger.log_hyperparams(resolved_config(cfg))
    trainer.loggers = loggers


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    run_keys = [key for key in cfg if key != "hydra"]  # hydra's own node is there only in composed tests
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True)


def validate(trainer: L.Trainer, module: L.LightningModule, data: ClassificationData) -> dict[str, float]:
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    return {key: float(value) for key, value in metrics.items()}


def write_results(out: Path, cfg: DictConfig, task: str, **extra: Any) -> Path:
    chosen = choices(cfg)
    results = {
        "task": task,
        **({"teacher": chosen.get("teacher")} if task in ("distill", "eval") else {}),
        "student": chosen.get("student"),
        **({"loss": chosen.get("loss")} if task in ("distill", "train") else {}),
        "data": chosen.get("data"),
        "seed": cfg.seed,
        **extra,
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    path = write_json_atomic(out / "results.json", results)
    log.info("results written to %s", path)
    return path
