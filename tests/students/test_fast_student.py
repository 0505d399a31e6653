"""The student's fast path: channels-last memory format (auto for conv nets) and torch.compile."""

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch import nn

from kd.errors import KdError
from kd.losses import AttentionTransfer, HintonKD
from kd.module import DistillationModule
from kd.students.card import card_for
from kd.students.export import export_student
from kd.students.fast import FastPath, is_conv_net, wants_channels_last
from kd.tasks.common import build_data, optimizer_factory
from kd.tasks.models import build_student, build_teacher
from kd.tasks.train import fit
from tests.tiny_models import tiny_student, tiny_teacher

# CRD's CIFAR pair at its smallest: resnet8 teaches resnet20, random weights, 10 random 32 px classes.
PAIR = [
    "teacher=resnet8",
    "student=resnet20",
    "teacher.weights=none",
    "student.weights=none",
    "data=fake",
    "data.num_classes=10",
    "data.image_size=16",
    "loss=kd_ce",  # a label term keeps the loss well away from 0, where a relative comparison means little
    "optim.lr=0.002",
    "data.train_size=320",
    "data.batch_size=16",
    "logger=none",
    "sched.warmup_epochs=0.2",
]


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def first_losses(cfg, steps: int, **module_options) -> tuple[list[float], DistillationModule]:
    """The training losses of the first ``steps`` steps of a distillation run, as kd's distill task builds it."""
    L.seed_everything(cfg.seed, verbose=False)
    data = build_data(cfg, cfg.student)
    teacher = build_teacher(cfg, data.num_classes, None)
    student = build_student(cfg.student, data.num_classes, None)
    loss = instantiate(cfg.loss)
    module = DistillationModule(
        student, loss, optimizer_factory(cfg), instantiate(cfg.sched), data.num_classes, teacher, **module_options
    )
    record = Losses()
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        accelerator="cpu",
    )
    L.seed_everything(cfg.seed, verbose=False)
    trainer.fit(module, datamodule=data)
    return record.values, module


@pytest.mark.slow
def test_a_channels_last_and_an_nchw_student_give_the_same_first_20_losses(make_cfg):
    cfg = make_cfg(*PAIR)
    nchw, plain = first_losses(cfg, 20, channels_last=False)
    nhwc, fast = first_losses(cfg, 20)  # auto: resnet20 is a conv net
    conv = next(m for m in fast.student.modules() if isinstance(m, nn.Conv2d))
    assert fast.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (
        not plain.channels_last
        and next(m for m in plain.student.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous()
    )
    assert len(nchw) == len(nhwc) == 20
    worst = max(abs(a - b) / abs(a) for a, b in zip(nchw, nhwc, strict=True))
    assert worst < 1e-4, (worst, [abs(a - b) / abs(a) for a, b in zip(nchw, nhwc, strict=True)])


def test_the_exported_weights_of_a_channels_last_student_are_plain_contiguous_tensors(make_cfg, tmp_path):
    cfg = make_cfg(*PAIR)
    data = build_data(cfg, cfg.student)
    student = build_student(cfg.student, data.num_classes, None)
    reference = copy.deepcopy(student.net.state_dict())
    DistillationModule(student, instantiate(cfg.loss), None, None, data.num_classes, build_teacher(cfg, 10, None))
    assert student.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    written = export_student(student, card_for(student, data, model="resnet20"), tmp_path, ["safetensors"])
    saved = load_file(written["safetensors"])
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        assert saved[key].is_contiguous() and torch.equal(saved[key], value), key


def test_conv_nets_are_told_apart_from_attention_nets():
    import timm

    assert is_conv_net(timm.create_model("resnet18", num_classes=10))
    assert not is_conv_net(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8))
    assert not is_conv_net(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert wants_channels_last("auto", nn.Conv2d(1, 1, 1)) and not wants_channels_last(False, nn.Conv2d(1, 1, 1))
    with pytest.raises(KdError, match="student.channels_last='fast'"):
        wants_channels_last("fast", nn.Conv2d(1, 1, 1))


@pytest.mark.slow
def test_a_compiled_student_trains_two_steps_to_the_eager_losses(make_cfg):
    cfg = make_cfg(*PAIR)
    eager, _ = first_losses(cfg, 2)
    compiled, module = first_losses(cfg, 2, compile=True)
    assert module.student_forward is not module.student  # the compiled wrapper ran, sharing the weights
    assert set(module.state_dict()) == {k for k in module.state_dict() if not k.startswith("student_forward")}
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, compiled, strict=True)) < 1e-4, (eager, compiled)


def test_compiling_the_student_with_a_feature_loss_is_refused_before_any_work(make_cfg):
    with pytest.raises(KdError, match="student.compile=true .* intermediate features"):
        fit(make_cfg("loss=fitnet", "student.compile=true"), task="distill")


def test_a_bad_channels_last_value_is_refused_before_any_work(make_cfg):
    with pytest.raises(KdError, match="student.channels_last='sometimes'"):
        fit(make_cfg("student.channels_last=sometimes"), task="distill")


def test_a_module_built_without_a_task_checks_its_own_fast_path_and_takes_a_tasks_as_it_is():
    with pytest.raises(KdError, match="student.compile=true .* intermediate features"):
        DistillationModule(tiny_student(), AttentionTransfer(), num_classes=10, teacher=tiny_teacher(), compile=True)
    with pytest.raises(KdError, match="student.channels_last='fast'"):
        DistillationModule(tiny_student(), HintonKD(), num_classes=10, teacher=tiny_teacher(), channels_last="fast")
    auto = FastPath.checked("auto", False, ())
    assert auto == FastPath(None, False) and auto.channels_last_for(tiny_student())  # a conv net: channels-last
    given = DistillationModule(tiny_student(), HintonKD(), num_classes=10, teacher=tiny_teacher(), fast=FastPath(False))
    assert not given.channels_last and given.student_forward is given.student
