"""``FrozenTeacher.train(True)``, as Lightning calls it on the module at every fit, leaves the teacher frozen."""

from __future__ import annotations

import torch
from torch import nn

from kd.models import Classifier
from kd.models.classifier import Preprocessing
from kd.teachers import FrozenTeacher


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 5),
    )  # fmt: skip


def teacher(bn_train_mode: bool) -> FrozenTeacher:
    preprocessing = Preprocessing(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
    model = Classifier(small_net(), preprocessing)
    with torch.no_grad():
        model.net[1].running_mean.normal_(0, 1), model.net[1].running_var.uniform_(0.5, 2)
    return FrozenTeacher(model, bn_train_mode=bn_train_mode, channels_last=False)


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.named_buffers()}


def test_train_true_leaves_every_submodule_in_eval_mode():
    frozen = teacher(bn_train_mode=False)
    frozen.train(True)
    assert [name for name, m in frozen.named_modules() if m.training] == []
    images = torch.rand(6, 3, 8, 8)
    before = buffers(frozen)
    first, second = frozen(images), frozen(images)
    assert torch.equal(first, second)  # no dropout, running statistics: deterministic
    assert torch.equal(frozen(images[:2]), first[:2])  # and independent of the rest of the batch
    assert all(torch.equal(value, buffers(frozen)[name]) for name, value in before.items())


def test_bn_train_mode_uses_batch_statistics_in_batchnorm_only_and_changes_no_buffer():
    frozen = teacher(bn_train_mode=True)
    frozen.train(True)
    training = [type(m).__name__ for _, m in frozen.named_modules() if m.training]
    assert training == ["BatchNorm2d"]  # dropout and everything else stay in eval mode
    images = torch.rand(6, 3, 8, 8)
    before = buffers(frozen)
    first = frozen(images)
    assert torch.equal(frozen(images), first)  # dropout is off
    assert not torch.allclose(frozen(images[:2]), first[:2])  # batch statistics: depends on the batch
    assert all(torch.equal(value, buffers(frozen)[name]) for name, value in before.items())  # nothing updated
    assert frozen.start_fingerprint == frozen.check_unchanged()
