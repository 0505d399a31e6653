import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from kd.errors import KdError
from kd.module import DistillationModule
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data, optimizer_factory
from kd.tasks.models import build_student, build_teacher
from tests.conftest import FAST


class RecordLR(L.Callback):
    """The learning rate in force when each optimizer step runs."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def expected_lr(step, base, warmup, total, min_lr):
    if step < warmup:
        return base * step / warmup
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_lr_follows_warmup_then_cosine_per_step(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "trainer.max_epochs=4", "sched.warmup_epochs=1", "sched.min_lr=0.001", "optim.lr=0.2")
    data = build_data(cfg, cfg.student)
    obtain = AutoWeights(cfg.paths.cache_dir, cfg.data, data, "cpu")
    module = DistillationModule(
        build_student(cfg.student, 10, obtain),
        instantiate(cfg.loss),
        optimizer_factory(cfg),
        instantiate(cfg.sched),
        10,
        build_teacher(cfg, 10, obtain),
    )
    record = RecordLR()
    trainer = L.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[record],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)

    steps_per_epoch = len(data.train_dataloader())
    total = 4 * steps_per_epoch
    assert len(record.lrs) == total
    warmup, halfway = steps_per_epoch, steps_per_epoch + (total - steps_per_epoch) // 2
    for step in (0, warmup, halfway, total - 1):
        assert record.lrs[step] == pytest.approx(expected_lr(step, 0.2, warmup, total, 0.001), abs=1e-12)
    assert record.lrs[0] == 0.0
    assert record.lrs[warmup] == pytest.approx(0.2)
    assert record.lrs[halfway] == pytest.approx((0.2 + 0.001) / 2, abs=0.2 / (total - warmup))


def test_a_default_warmup_longer_than_the_run_shrinks_to_a_tenth_a_set_one_is_refused():
    from kd.training.schedule import warmup_cosine

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fitted = warmup_cosine(optimizer, total_steps=40, steps_per_epoch=40, warmup_epochs=1, fit_to_run=True)
    assert fitted.warmup_t == 4 and fitted.t_initial == 36
    kept = warmup_cosine(optimizer, total_steps=80, steps_per_epoch=40, warmup_epochs=1, fit_to_run=True)
    assert kept.warmup_t == 40  # a warmup that fits stays as it is
    with pytest.raises(KdError, match="covers the whole run"):
        warmup_cosine(optimizer, total_steps=40, steps_per_epoch=40, warmup_epochs=1)


def test_a_recipes_milestones_past_a_short_run_are_dropped_unless_the_user_set_them():
    from kd.training.multistep import warmup_multistep

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    short = warmup_multistep(optimizer, 10, 10, milestones=[150, 180], warmup_epochs=20, fit_to_run=True)
    assert short.milestones == [] and short.warmup_steps == 1
    with pytest.raises(KdError, match="reaches epoch 180"):
        warmup_multistep(optimizer, 10, 10, milestones=[150, 180])


def test_only_the_keys_the_user_set_count_as_set(make_cfg):
    from kd.tasks.common import schedule_for, user_set_keys

    recipe = make_cfg("experiment=cifar100_kd", "trainer.max_epochs=1")
    assert "sched.milestones" not in user_set_keys(recipe) and "trainer.max_epochs" in user_set_keys(recipe)
    assert schedule_for(recipe).keywords["fit_to_run"] is True
    chosen = make_cfg("sched.warmup_epochs=2")
    assert "fit_to_run" not in getattr(schedule_for(chosen), "keywords", {})
