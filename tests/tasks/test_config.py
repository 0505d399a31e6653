"""Every option of every config group composes with the rest and instantiates."""

import functools
import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from kd.data import ClassificationData
from kd.data.mixup import BatchMixup
from kd.launch.configs import CONF_DIR
from kd.losses import DistillationLoss
from kd.tasks.common import optimizer_factory, run_precision
from tests.tiny_models import loss_on_images

GROUPS = ("data", "loss", "mixup", "optim", "sched", "trainer", "logger", "callbacks", "task", "experiment")
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def imagefolder_tree(root: Path, classes: int) -> Path:
    for split in ("train", "val"):
        for index in range(classes):
            (root / split / f"class{index:04d}").mkdir(parents=True)
    return root


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert options(group), group


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(make_cfg, tmp_path, option):
    classes = 1000 if option == "imagenet" else 3
    root = imagefolder_tree(tmp_path / "images", classes)
    needs_root = option in ("imagefolder", "imagenet")
    cfg = make_cfg(f"data={option}", *([f"data.root={root}"] if needs_root else []))
    data = instantiate(cfg.data)
    assert isinstance(data, ClassificationData) and data.num_classes > 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_model_options_compose(make_cfg, role, name):
    """Every zoo model composes in both roles; tests/models/test_zoo.py builds and runs each one."""
    cfg = make_cfg(f"{role}={name}")
    arch = instantiate(cfg[role].arch)
    assert arch.preprocessing().in_chans in (1, 3)
    assert cfg[role].name == name


# loss=deit needs a student with a distillation head: tests/losses/test_deit.py builds one.
@pytest.mark.parametrize("option", [o for o in options("loss") if o != "deit"])
def test_loss_options_instantiate(make_cfg, option):
    loss = instantiate(make_cfg(f"loss={option}").loss)
    assert isinstance(loss, DistillationLoss)
    value, _, _ = loss_on_images(loss, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert value.ndim == 0 and torch.isfinite(value)


@pytest.mark.parametrize("option", options("mixup"))
def test_mixup_options_instantiate_and_mix(make_cfg, option):
    mixup = instantiate(make_cfg(f"mixup={option}").mixup)
    assert isinstance(mixup, BatchMixup)
    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    mixed, soft = mixup(images, labels, 10, key=(0, 0, 0))
    assert mixed.shape == images.shape and soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("sched", options("sched"))
def test_optim_and_sched_options_instantiate(make_cfg, optim, sched):
    cfg = make_cfg(f"optim={optim}", f"sched={sched}")
    optimizer = optimizer_factory(cfg)(torch.nn.Linear(3, 3))
    # 240 epochs of 10 steps: the length sched=multistep's default milestones (150, 180, 210) are for.
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=2400, steps_per_epoch=10)
    scheduler.step_update(1700)
    assert 0 < optimizer.param_groups[0]["lr"] < cfg.optim.lr


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate(make_cfg, option):
    cfg = make_cfg(f"trainer={option}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"trainer={option} needs GPUs (it composes: {cfg.trainer.strategy}, {cfg.trainer.devices} devices)")
    # precision=auto is kd's: the task resolves it for the device before Lightning sees it
    assert isinstance(instantiate(cfg.trainer, precision=run_precision(cfg)), L.Trainer)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_write_into_the_run_folder(make_cfg, tmp_path, option):
    """Every logger is a Lightning logger whose files go under paths.output_dir (a sweep keeps each job's own)."""
    cfg = make_cfg(f"logger={option}")
    for name, item in (cfg.logger or {}).items():
        logger = instantiate(item)
        assert isinstance(logger, Logger), name
        assert Path(logger.save_dir).resolve() == (tmp_path / "out").resolve(), name


def test_callback_options_do_what_their_comments_say(make_cfg, tmp_path):
    cfg = make_cfg()
    callbacks = {name: instantiate(item) for name, item in cfg.callbacks.items()}
    assert all(isinstance(callback, L.Callback) for callback in callbacks.values())
    checkpoint = callbacks["checkpoint"]
    assert isinstance(checkpoint, ModelCheckpoint)
    assert Path(checkpoint.dirpath).resolve() == (tmp_path / "out" / "checkpoints").resolve()
    assert checkpoint.save_last and checkpoint.save_top_k == 0  # only last.ckpt
    assert isinstance(callbacks["lr_monitor"], LearningRateMonitor)
    assert callbacks["lr_monitor"].logging_interval == "step"


@pytest.mark.parametrize("option", options("task"))
def test_task_options_take_the_run_config_and_their_own_keys(make_cfg, option):
    """run_task calls ``instantiate(cfg.task)(cfg)``: the function is one of kd.tasks, every extra key of the
    task's yaml is one of its parameters, and the call binds (a renamed parameter fails here, before any run)."""
    cfg = make_cfg(f"task={option}")
    task = instantiate(cfg.task)
    assert isinstance(task, functools.partial) and task.func.__module__.startswith("kd.tasks.")
    own = {key for key in cfg.task if key not in ("_target_", "_partial_")}
    assert set(task.keywords) == own
    parameters = inspect.signature(task.func).parameters
    assert own <= set(parameters) and next(iter(parameters)) == "cfg"
    inspect.signature(task).bind(cfg)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options_compose(make_cfg, option):
    """Each recipe names zoo models, or any timm / torchvision model by name, for both roles (a renamed model yaml
    breaks the recipe here)."""
    cfg = make_cfg(f"experiment={option}")
    by_name = [path.stem for path in (CONF_DIR / "any_model").glob("*.yaml")]
    assert cfg.teacher.name in [*MODELS, *by_name] and cfg.student.name in [*MODELS, *by_name]
