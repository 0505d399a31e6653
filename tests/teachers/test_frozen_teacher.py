import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from kd.module import DistillationModule
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data, optimizer_factory
from kd.tasks.models import build_student, build_teacher
from kd.teachers import fingerprint
from tests.conftest import FAST


def build(cfg):
    data = build_data(cfg, cfg.student)
    obtain = AutoWeights(cfg.paths.cache_dir, cfg.data, data, "cpu")
    teacher = build_teacher(cfg, data.num_classes, obtain)
    module = DistillationModule(
        build_student(cfg.student, data.num_classes, obtain),
        instantiate(cfg.loss),
        optimizer_factory(cfg),
        instantiate(cfg.sched),
        data.num_classes,
        teacher,
    )
    return data, teacher, module


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_bit_identical(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def trainer_for(tmp_path, max_epochs=2):
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1, every_n_epochs=1)
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[every_epoch],
    )


def test_teacher_is_bit_identical_after_fit_and_stays_out_of_optimizer_and_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "sched.warmup_epochs=0")
    data, teacher, module = build(cfg)
    before = snapshot(teacher)
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)

    trainer = trainer_for(tmp_path)
    trainer.fit(module, datamodule=data)

    assert_bit_identical(before, snapshot(teacher))
    assert teacher.check_unchanged() == teacher.start_fingerprint
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher_params = {id(p) for p in teacher.parameters()}
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert optimized and not any(id(p) in teacher_params for p in optimized)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())

    path = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher") for k in checkpoint["state_dict"])
    assert all(k.startswith(("student.", "loss.")) for k in checkpoint["state_dict"])
    assert checkpoint["teacher_fingerprint"] == teacher.start_fingerprint

    # Resume: a fresh module (teacher rebuilt from its source) continues from the checkpoint.
    data, teacher2, module2 = build(cfg)
    resumed = trainer_for(tmp_path / "resumed")
    resumed.fit(module2, datamodule=data, ckpt_path=path)
    assert resumed.global_step == 6  # 3 steps restored, 3 more run
    saved_fc = checkpoint["state_dict"]["student.net.fc.weight"]
    assert not torch.equal(module2.student.net.fc.weight.detach(), saved_fc)
    assert_bit_identical(before, snapshot(teacher2))


def test_bn_train_mode_uses_batch_statistics_without_touching_buffers(make_cfg):
    cfg = make_cfg(*FAST, "teacher.bn_train_mode=true")
    data, teacher, module = build(cfg)
    images, _, _ = next(iter(data.train_dataloader()))
    eval_cfg = make_cfg(*FAST)
    _, eval_teacher, _ = build(eval_cfg)
    before = fingerprint(teacher)
    module.train()
    batch_stats = teacher(images)
    assert fingerprint(teacher) == before
    assert not torch.allclose(batch_stats, eval_teacher(images))


def test_teacher_runs_without_autograd_and_returns_a_normal_tensor(make_cfg):
    cfg = make_cfg(*FAST)
    data, teacher, _ = build(cfg)
    images, _ = next(iter(data.val_dataloader()))
    logits = teacher(images)
    assert not logits.requires_grad and not logits.is_inference()
