"""loss=hard_kd and loss=deit: the formulas against timm's TokenDistillationTask and by hand, label masking, and a
tiny distilled DeiT student distilled end to end, whose exported logits are the average of its two heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.task import TokenDistillationTask

from kd.data.unlabeled import UNLABELED
from kd.errors import KdError
from kd.losses import DeiTDistillation, HardLabelKD
from kd.models import Classifier, Preprocessing
from kd.tasks.common import trained_student_of
from kd.tasks.train import fit
from tests.tiny_models import tiny_student, tiny_teacher

RGB = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 8, 8), crop_pct=1.0)
# deit_tiny_distilled at 8 px: patch 2 (16 tokens + class + distillation token), 2 blocks of width 32.
TINY_DEIT = {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_DEIT_CFG = [
    "student=timm",
    "student.model=deit_tiny_distilled_patch16_224",
    "student.weights=none",
    *(f"+student.arch.{k}={v}" for k, v in TINY_DEIT.items()),
    "+student.arch.data_config={input_size:[3,8,8],mean:[0.5,0.5,0.5],std:[0.5,0.5,0.5]}",
]


def tiny_deit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **TINY_DEIT)


def logits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(6, 10, generator=generator) * 3,
        torch.randn(6, 10, generator=generator) * 3,
        torch.randn(6, 10, generator=generator) * 3,
    )


def test_hard_kd_is_the_cross_entropy_with_the_teachers_top_class():
    student, teacher, _ = logits(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    by_hand = -F.log_softmax(student, dim=1)[torch.arange(6), teacher.argmax(dim=1)].mean()
    assert HardLabelKD()(student, teacher, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    unlabeled = torch.full((6,), UNLABELED)  # no label needed: the same value without any
    assert HardLabelKD()(student, teacher, unlabeled).item() == pytest.approx(by_hand.item(), rel=1e-6)
    smoothed = HardLabelKD(label_smoothing=0.1)(student, teacher, labels)
    expected = F.cross_entropy(student, teacher.argmax(dim=1), label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6) and smoothed.item() != by_hand.item()
    with_labels = HardLabelKD(ce_weight=0.5)
    with_labels(student, teacher, labels)
    assert with_labels.last_terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(student, labels).item(), 1e-6)


def test_hard_kd_takes_the_top_class_of_the_mixed_view_the_teacher_saw(make_cfg):
    """Through the module: the target is the argmax of the teacher's logits on the very (mixed) batch."""
    loss = instantiate(make_cfg("loss=hard_kd").loss)
    student, teacher = tiny_student(), tiny_teacher()
    images = torch.rand(4, 1, 8, 8)
    mixed = 0.6 * images + 0.4 * images.flip(0)
    teacher_logits = teacher(mixed)
    value = loss(student(mixed), teacher_logits, torch.full((4, 10), 0.1))
    expected = F.cross_entropy(student(mixed), teacher_logits.argmax(dim=1))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("distill_type", ["hard", "soft"])
def test_deit_equals_timms_token_distillation_task(distill_type):
    """The same student outputs and teacher logits: kd's loss equals timm's TokenDistillationTask within 1e-6 (timm
    with task_loss_weight=0.5, i.e. DeiT's 1/2 and 1/2)."""
    student, teacher = tiny_deit(0).train(), tiny_deit(1).eval()
    task = TokenDistillationTask(
        student, teacher, torch.nn.CrossEntropyLoss(), distill_type=distill_type, task_loss_weight=0.5,
        temperature=3.0, verbose=False,
    )  # fmt: skip
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    expected = task(images, labels)
    heads = student(images)
    assert isinstance(heads, tuple) and len(heads) == 2  # set_distilled_training(True) by timm's task
    with torch.no_grad():
        teacher_logits = teacher(images)  # timm's task renormalizes for the teacher: same mean and std here
    ours = DeiTDistillation(distill_type=distill_type, temperature=3.0)
    value = ours(heads, teacher_logits, labels)
    assert abs(value.item() - expected["loss"].item()) < 1e-6
    assert abs(ours.last_terms["distill"].item() * 2 - expected["distill_loss"].item()) < 1e-6
    assert abs(ours.last_terms["ce"].item() * 2 - expected["task_loss"].item()) < 1e-6


@pytest.mark.parametrize("distill_type", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_deit_gradient_reaches_both_heads_and_stays_finite_for_extreme_logits(distill_type, dtype):
    for scale in (1.0, 1e4):
        class_logits, distillation_logits, teacher = (t.sign() * scale for t in logits(3))
        heads = [class_logits.to(dtype).requires_grad_(True), distillation_logits.to(dtype).requires_grad_(True)]
        teacher = teacher.to(dtype).requires_grad_(True)
        value = DeiTDistillation(distill_type=distill_type, temperature=4.0)(tuple(heads), -teacher, torch.arange(6))
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert all(
            h.grad is not None and torch.isfinite(h.grad.float()).all() and h.grad.abs().sum() > 0 for h in heads
        )
        assert teacher.grad is None  # the teacher is a fixed target


def test_deit_masks_the_class_head_for_unlabeled_images_only():
    class_logits, distillation_logits, teacher = logits(2)
    labels = torch.tensor([3, UNLABELED, 1, UNLABELED, 0, 9])
    loss = DeiTDistillation(distill_type="soft", temperature=2.0)
    loss((class_logits, distillation_logits), teacher, labels)
    known = labels >= 0
    ce = F.cross_entropy(class_logits[known], labels[known])
    assert loss.last_terms["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-6)
    kl = F.kl_div(F.log_softmax(distillation_logits / 2, 1), F.log_softmax(teacher / 2, 1), reduction="batchmean",
                  log_target=True)  # fmt: skip
    assert loss.last_terms["distill"].item() == pytest.approx(0.5 * 4 * kl.item(), rel=1e-6)  # every image
    loss((class_logits, distillation_logits), teacher, torch.full((6,), UNLABELED))
    assert loss.last_terms["ce"].item() == 0.0


def test_deit_refuses_a_student_without_a_distillation_head():
    student = Classifier(timm.create_model("resnet18", num_classes=10), RGB)
    with pytest.raises(KdError, match=r"loss=deit .* ResNet lacks; choose a timm model with set_distilled_training"):
        DeiTDistillation().bind(student, tiny_teacher())


@pytest.mark.slow
@pytest.mark.parametrize("distill_type", ["hard", "soft"])
def test_a_tiny_distilled_deit_distills_end_to_end_and_exports_the_average_of_its_heads(make_cfg, distill_type):
    cfg = make_cfg(
        "teacher.pretrain.epochs=3", "loss=deit", f"loss.distill_type={distill_type}", *TINY_DEIT_CFG,
        "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
        "sched.warmup_epochs=0", "optim.lr=0.01", "logger=csv",
    )  # fmt: skip
    results = fit(cfg, task="distill")
    results_dir = cfg.paths.output_dir
    history = (Path(results_dir) / "csv" / "metrics.csv").read_text()
    assert "train/loss/distill" in history and "train/loss/ce" in history  # both heads trained, logged by name
    assert results["metrics"]["student/top1"] >= 0
    weights = f"{results_dir}/student.safetensors"
    assert json.loads((Path(results_dir) / "student.json").read_text())
    student, _ = trained_student_of(make_cfg(*TINY_DEIT_CFG, f"student.weights={weights}"))
    student.eval()
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        exported = student(images)
        tokens = student.net.forward_features(student.normalize(images))
        class_head, distillation_head = student.net.head(tokens[:, 0]), student.net.head_dist(tokens[:, 1])
    torch.testing.assert_close(exported, (class_head + distillation_head) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(class_head, distillation_head, atol=1e-4)  # two heads that learnt different targets
