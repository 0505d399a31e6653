import math

import lightning as L
import pytest
from hydra.utils import instantiate

from kd.module import DistillationModule
from kd.students.build import build_student
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data, optimizer_factory
from kd.teachers.build import build_teacher
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
