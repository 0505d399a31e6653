"""``kd.distill``: distill a plain teacher into a plain student from a notebook, the way ``python run.py`` does.

The run is ``task=distill`` of kd's own config (``conf/``), composed with the same defaults a command line gets
(optimizer, LR schedule, trainer, callbacks), then run by ``kd.tasks.train.fit``, the function behind
``python run.py``. Only the data, the two models and, if given as an object, the loss come from Python instead
of the config. So a run here and the same ``python run.py`` run with the same weights, data and seed train
the same student (``tests/test_library.py`` checks that they end with equal weights).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader

from kd.data.loaders import LoaderData
from kd.errors import KdError
from kd.launch.keys import kd_hydra, unknown_key_problem
from kd.launch.preflight import config_groups
from kd.losses.base import DistillationLoss
from kd.models.wrap import as_classifier, model_name
from kd.results.dashboards import finish_dashboards
from kd.tasks.given import Given
from kd.tasks.train import fit
from kd.teachers.frozen import FrozenTeacher
from kd.teachers.pair import checked_models
from kd.teachers.precision import teacher_precision

log = logging.getLogger("kd")

#: The keys of ``cfg.teacher`` that are settings of the frozen teacher, not of its architecture.
TEACHER_SETTINGS = ("bn_train_mode", "channels_last", "compile", "cache", "cache_topk")


def option_overrides(options: Mapping[str, Any]) -> list[str]:
    """``optim="adamw"`` -> ``optim=adamw``; ``optim={"lr": 0.05}`` -> ``optim.lr=0.05``; ``mixup=None`` -> ``~mixup``:
    each keyword is a top-level key of kd's config, spelled as on ``python run.py``'s command line."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if v is None:
            return "null"
        if isinstance(v, list | tuple):
            return "[" + ",".join(value(item) for item in v) + "]"
        return str(v)

    overrides = []
    for key, setting in options.items():
        if isinstance(setting, Mapping):
            overrides += [f"{key}.{sub}={value(v)}" for sub, v in setting.items()]
        elif setting is None:
            overrides.append(f"~{key}")
        else:
            overrides.append(f"{key}={value(setting)}")
    return overrides


def run_config(overrides: Sequence[str], task: str = "distill") -> DictConfig:
    """kd's ``task=<task>`` config with ``overrides``, as ``python run.py OVERRIDES`` composes it."""
    try:
        with kd_hydra():
            return compose("config", overrides=[f"task={task}", *overrides], return_hydra_config=True)
    except HydraException as error:
        # optim={"learning_rate": 0.1}: the one line python run.py gives
        unknown = unknown_key_problem([f"task={task}", *overrides], set(config_groups()))
        if unknown is not None:
            raise unknown from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KdError(
            f"the options {list(overrides)} are not a valid kd run ({first}); use the keys of python run.py's "
            "command line (see conf/)"
        ) from None


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    /,
    loss: str | DistillationLoss = "kd",
    epochs: int | None = None,
    *,
    seed: int = 0,
    output_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on the given loaders and return the run's results (``results.json``).

    ``teacher`` and ``student`` are plain networks (timm models normalize as their ``pretrained_cfg`` says; wrap
    others with ``kd.as_classifier``); the loaders yield ``(images in [0, 1], labels)`` and are used as built. The
    student is trained in place; the teacher is frozen in place. ``loss`` is a ``conf/loss`` name or a
    ``kd.losses`` object; ``epochs`` defaults to ``trainer.max_epochs`` of the config. Every other setting is a
    keyword named like a top-level config key (``optim="adamw"``, ``optim={"lr": 0.05}``, ``sched=None``,
    ``mixup="mixup"``, ``trainer={"precision": "bf16-mixed"}``, ``teacher={"channels_last": False}``) or a raw
    ``overrides`` string of the command line.

    ``output_dir``: the folder ``python run.py`` writes (``results.json``, ``student.safetensors`` and its card,
    checkpoints, logs); without it the run works in a temporary folder, removed at the end, with no logger.
    """
    if not isinstance(loss, str | DistillationLoss):
        raise KdError(f"loss must be a conf/loss name such as 'kd' or a kd.losses object, got {type(loss).__name__}")
    quiet = output_dir is None and "logger" not in options
    settings = option_overrides({**({"logger": "none"} if quiet else {}), **options})
    cfg = run_config([*(["loss=" + loss] if isinstance(loss, str) else []), *settings, *overrides])
    if OmegaConf.select(cfg, "teacher.cache"):
        raise KdError(
            f"teacher.cache={cfg.teacher.cache} looks the teacher's outputs up by kd's view ids, which plain "
            "DataLoaders do not yield; leave the cache out, or train with python run.py on a kd data module"
        )
    teacher_cfg = cfg.teacher
    freeze = lambda model: FrozenTeacher(  # noqa: E731 - the frozen regime of cfg.teacher, as build_teacher does
        model,
        bn_train_mode=bool(teacher_cfg.get("bn_train_mode", False)),
        channels_last=bool(teacher_cfg.get("channels_last", True)),
        compile=bool(teacher_cfg.get("compile", False)),
        precision=teacher_precision(teacher_cfg.get("precision", "auto")),
    )
    student_model, frozen, num_classes = checked_models(as_classifier(student), teacher, None, freeze)
    data = LoaderData(train_loader, val_loader, num_classes, class_names)

    folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="kd-distill-"))
    describe_run(cfg, frozen, student_model, data, loss, seed, epochs, folder, temporary=output_dir is None)
    given = Given(data=data, student=student_model, teacher=frozen, loss=None if isinstance(loss, str) else loss)
    try:
        results = fit(cfg, task="distill", given=given)
    except Exception:
        finish_dashboards(None)  # a dashboard run ends marked failed, as in python run.py
        raise
    finally:
        if output_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    finish_dashboards(results)
    if output_dir is None:
        results["output_dir"] = None
    return results


def describe_run(
    cfg: DictConfig,
    teacher: FrozenTeacher,
    student: nn.Module,
    data: LoaderData,
    loss: str | DistillationLoss,
    seed: int,
    epochs: int | None,
    folder: Path,
    temporary: bool,
) -> None:
    """The config says what this run really trains: the given models, loaders and loss, not conf's defaults."""
    with open_dict(cfg):
        cfg.seed = seed
        cfg.paths.output_dir = str(folder)
        if epochs is not None:
            cfg.trainer.max_epochs = epochs
        if temporary:  # nothing outlives the run: no checkpoint to write
            cfg.callbacks.checkpoint = None
            cfg.trainer.enable_checkpointing = False
        cfg.teacher = {"name": model_name(teacher.model), **{k: cfg.teacher.get(k) for k in TEACHER_SETTINGS}}
        cfg.student = {"name": model_name(student)}
        cfg.data = data.describe()
        if not isinstance(loss, str):
            cfg.loss = {"_target_": f"{type(loss).__module__}.{type(loss).__qualname__}"}
        choices = cfg.hydra.runtime.choices
        choices.teacher, choices.student, choices.data = cfg.teacher.name, cfg.student.name, "dataloaders"
        if not isinstance(loss, str):
            choices.loss = type(loss).__name__


def quantize(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    /,
    output_dir: str | Path,
    method: str = "qad",
    loss: str | DistillationLoss = "kd",
    epochs: int = 3,
    calibration_batches: int = 8,
    *,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """``python run.py task=quantize`` on a trained ``student`` (a ``kd.distill`` result, say) and its ``teacher``:
    writes ``student.onnx`` and ``student.int8.onnx`` (with their cards) and ``results.json`` into ``output_dir``
    and returns the results. ``method``: ``qad`` (``epochs`` of distillation from the frozen fp32 teacher while
    fake-quantized, with ``loss``) or ``ptq`` (calibration only). The student itself is left as it is; other
    settings are keywords named like config keys (``optim={"lr": 0.05}``, ``quantize={"lr_scale": 0.2}``)."""
    if not isinstance(loss, str | DistillationLoss):
        raise KdError(f"loss must be a conf/loss name such as 'kd' or a kd.losses object, got {type(loss).__name__}")
    settings = option_overrides({"logger": "none", **options})
    quantize_settings = [f"quantize.method={method}", f"quantize.epochs={epochs}"]
    quantize_settings.append(f"quantize.calibration_batches={calibration_batches}")
    loss_choice = ["loss=" + loss] if isinstance(loss, str) else []
    cfg = run_config([*loss_choice, *quantize_settings, *settings, *overrides], task="quantize")
    teacher_cfg = cfg.teacher
    freeze = lambda model: FrozenTeacher(  # noqa: E731 - as in distill
        model,
        bn_train_mode=bool(teacher_cfg.get("bn_train_mode", False)),
        channels_last=bool(teacher_cfg.get("channels_last", True)),
        compile=bool(teacher_cfg.get("compile", False)),
    )
    student_model, frozen, num_classes = checked_models(as_classifier(student), teacher, None, freeze)
    data = LoaderData(train_loader, val_loader, num_classes, class_names)
    describe_run(cfg, frozen, student_model, data, loss, seed, None, Path(output_dir), temporary=False)
    given = Given(data=data, student=student_model, teacher=frozen, loss=None if isinstance(loss, str) else loss)
    from kd.tasks.quantize import quantize_student  # the ONNX Runtime quantizer loads only when asked for

    return quantize_student(cfg, given)
