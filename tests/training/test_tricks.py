"""Bag of Tricks switches: mixup/cutmix once per batch, no bias decay, linear LR scaling, zero-init of the
last BatchNorm, mixed precision. Each is checked on a real training step or a real built model."""

import json
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from kd.data.digits import DigitsData
from kd.data.mixup import BatchMixup
from kd.errors import KdError
from kd.losses import HintonKD
from kd.module import DistillationModule
from kd.tasks.common import optimizer_factory
from kd.tasks.models import build_student, build_teacher_model
from tests.conftest import run_cli
from tests.tiny_models import tiny_student, tiny_teacher


def digits(batch_size: int = 8) -> DigitsData:
    data = DigitsData(batch_size=batch_size)
    data.setup("fit")
    return data


def quick_trainer(**kwargs) -> L.Trainer:
    settings = {
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "accelerator": "cpu",
    }
    return L.Trainer(**{**settings, **kwargs})


class RecordingKD(HintonKD):
    """Hinton KD with a label term, remembering the targets it was given."""

    def __init__(self):
        super().__init__(temperature=4.0, alpha=0.5)
        self.targets = []

    def terms(self, student_logits, teacher_logits, target):
        self.targets.append(target.clone())
        return super().terms(student_logits, teacher_logits, target)


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[0].clone(), batch[1].clone()))


def record_inputs(model, seen: list) -> None:
    """Remember every image tensor ``model`` receives for a training forward pass: through
    ``forward_with_features`` (the teacher; a student read for feature maps) or, for a student in training
    mode without feature maps, its plain forward (kd's fast path)."""
    with_features, plain = model.forward_with_features, model.forward

    def recording(images, stages=()):
        seen.append(images.clone())
        return with_features(images, stages)

    def recording_plain(images):
        if model.training:
            seen.append(images.clone())
        return plain(images)

    model.forward_with_features = recording
    model.forward = recording_plain


def test_mixup_reaches_teacher_and_student_as_the_same_mixed_tensor_with_mixed_labels():
    student, teacher, loss = tiny_student(), tiny_teacher(), RecordingKD()
    mixup = BatchMixup(mixup_alpha=0.4, seed=3)
    module = DistillationModule(student, loss, partial(torch.optim.SGD, lr=0.01), None, 10, teacher, mixup)
    seen_student, seen_teacher = [], []
    record_inputs(student, seen_student)
    record_inputs(teacher, seen_teacher)
    batches = RecordBatches()
    quick_trainer(callbacks=[batches]).fit(module, datamodule=digits())

    assert len(seen_student) == len(seen_teacher) == len(batches.batches) == 2
    for (images, labels), to_student, to_teacher, target in zip(
        batches.batches, seen_student, seen_teacher, loss.targets, strict=True
    ):
        assert torch.equal(to_student, to_teacher)  # one mixed tensor for both
        partner = images.flip(0)
        difference = images - partner
        lam = float((to_student - partner).mul(difference).sum() / difference.pow(2).sum())
        assert 0.0 < lam < 1.0 and not torch.equal(to_student, images)
        torch.testing.assert_close(to_student, lam * images + (1 - lam) * partner)
        one_hot = F.one_hot(labels, 10).float()
        torch.testing.assert_close(target, lam * one_hot + (1 - lam) * one_hot.flip(0))


def test_mixup_draws_are_reproducible_from_seed_and_position_and_leave_numpy_alone():
    import numpy as np

    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8)
    images_before = images.clone()  # taken before any call, to show the calls leave the batch as it was
    mixup = BatchMixup(mixup_alpha=1.0, cutmix_alpha=1.0, seed=7)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = mixup(images, labels, 10, key=(0, 2, 5))
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global state is restored
    again = BatchMixup(mixup_alpha=1.0, cutmix_alpha=1.0, seed=7)(images, labels, 10, key=(0, 2, 5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [mixup(images, labels, 10, key=(0, 2, index))[1] for index in range(6, 10)]
    assert any(not torch.equal(first[1], other) for other in others)
    assert torch.equal(images, images_before)  # the input batch is left as it was


def test_odd_batch_is_refused_with_one_sentence(tmp_path, cache_dir):
    with pytest.raises(KdError, match="data.batch_size is 7, an odd number; use an even data.batch_size"):
        BatchMixup(batch_size=7)
    with pytest.raises(KdError, match="this training batch's size is 5"):
        BatchMixup()(torch.rand(5, 1, 8, 8), torch.arange(5), 10, key=(0, 0, 0))
    result = run_cli("mixup=mixup", "data.batch_size=63", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mixup/cutmix pairs every image") and "63" in lines[0]


def test_no_bias_decay_puts_biases_and_batchnorm_in_a_group_without_weight_decay(make_cfg):
    student = tiny_student()
    optimizer = optimizer_factory(make_cfg("optim.no_bias_decay=true", "optim.weight_decay=0.01"))(student)
    by_decay = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    names = {id(p): name for name, p in student.named_parameters()}
    no_decay = {names[i] for i in by_decay[0.0]}
    decay = {names[i] for i in by_decay[0.01]}
    batchnorm = {n for n, m in student.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert no_decay == {f"{bn}.{p}" for bn in batchnorm for p in ("weight", "bias")} | {"net.fc.bias"}
    assert decay == {n for n, p in student.named_parameters() if p.ndim > 1}
    plain = optimizer_factory(make_cfg("optim.weight_decay=0.01"))(student)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01]


def test_linear_scaling_rule_uses_the_global_batch(make_cfg):
    recipe = optimizer_factory(make_cfg("optim.lr=0.1", "optim.lr_batch_size=256"))
    module = DistillationModule(tiny_student(), HintonKD(), recipe, None, 10, tiny_teacher())
    trainer = quick_trainer(accumulate_grad_batches=2)
    trainer.fit(module, datamodule=digits(batch_size=16))
    # 16 images per device x 1 device x 2 accumulated batches = 32 images per optimizer step
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 32 / 256)
    assert recipe.lr_for(1024) == pytest.approx(0.4)
    unscaled = optimizer_factory(make_cfg("optim.lr=0.1"))
    assert unscaled.lr_for(1024) == pytest.approx(0.1)


def last_bn_weights(net: nn.Module) -> torch.Tensor:
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8  # resnet18
    return torch.cat([block.bn2.weight.detach() for block in blocks])


def test_zero_init_last_bn_is_a_real_switch_for_students_from_scratch(make_cfg):
    cfg = make_cfg("student=resnet18", "student.weights=none", "student.zero_init_last_bn=true")
    assert torch.count_nonzero(last_bn_weights(build_student(cfg.student, 10).net)) == 0
    # Off by default: PyTorch's gamma = 1, although timm alone would have started these at 0.
    assert torch.count_nonzero(last_bn_weights(instantiate(cfg.student.arch).build(10))) == 0
    cfg = make_cfg("student=resnet18", "student.weights=none")
    weights = last_bn_weights(build_student(cfg.student, 10).net)
    assert torch.equal(weights, torch.ones_like(weights))
    other_bn = build_student(cfg.student, 10).net.layer1[0].bn1.weight
    assert torch.equal(other_bn, torch.ones_like(other_bn))


def test_zero_init_last_bn_refuses_what_it_cannot_do(make_cfg):
    digits_from_scratch = make_cfg("student.weights=none", "student.zero_init_last_bn=true")
    with pytest.raises(KdError, match="student digits_student has no residual blocks"):
        build_student(digits_from_scratch.student, 10)
    loaded = make_cfg("student=resnet18", "student.zero_init_last_bn=true")
    with pytest.raises(KdError, match="student.weights=pretrained loads weights"):
        build_student(loaded.student, 10)
    teacher = make_cfg("teacher=resnet18", "teacher.weights=none", "+teacher.zero_init_last_bn=true")
    with pytest.raises(KdError, match="applies to a student trained from scratch only"):
        build_teacher_model(teacher.teacher, 10)


@pytest.mark.parametrize("option", ["ce", "kd", "dkd", "dist", "dml", "fitnet"])
def test_losses_train_under_bf16_mixed_precision(make_cfg, option):
    module = DistillationModule(
        tiny_student(), instantiate(make_cfg(f"loss={option}").loss), None, None, 10, tiny_teacher()
    )
    module.optimizer_factory = lambda model, batch: torch.optim.SGD(model.parameters(), lr=0.05)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = quick_trainer(precision="bf16-mixed")
    trainer.fit(module, datamodule=digits())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())


@pytest.mark.slow
def test_bag_of_tricks_run_end_to_end(tmp_path, cache_dir):
    from tests.conftest import FAST

    result = run_cli(
        *FAST,
        "mixup=mixup_cutmix",
        "loss=kd_ce",
        "loss.terms.ce.loss.label_smoothing=0.1",
        "optim.no_bias_decay=true",
        "optim.lr_batch_size=256",
        "trainer.precision=bf16-mixed",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["loss"] == "kd_ce" and 0.0 <= results["metrics"]["student/top1"] <= 1.0
    assert (
        "linear LR scaling: optim.lr 0.1 for 256 images x global batch 64 = 0.025" in (tmp_path / "run.log").read_text()
    )
