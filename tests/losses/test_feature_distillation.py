"""loss=fitnet end to end: intermediate features of the same forward pass, a trained adapter that lives on
the loss side (optimizer, checkpoint as loss.*, never in the student's weights), a teacher left untouched."""

import lightning as L
import pytest
import timm
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from kd.losses import FitNet
from kd.models import Classifier, Preprocessing
from kd.module import DistillationModule
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data, optimizer_factory
from kd.tasks.models import build_student, build_teacher
from kd.teachers import FrozenTeacher
from kd.weights.files import load_into, read_state_dict
from tests.conftest import FAST
from tests.tiny_models import tiny_student

RGB = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 32, 32))


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_student(), lambda: Classifier(timm.create_model("resnet18", num_classes=10), RGB)],
    ids=["convnet", "timm-resnet18"],
)
def test_features_come_from_the_same_forward_pass_as_the_logits(make):
    model = make().eval()
    channels, size = model.preprocessing.input_size[0], model.preprocessing.input_size[1]
    images = torch.rand(2, channels, size, size)
    info = model.feature_info()
    stages = tuple(range(len(info)))
    with torch.no_grad():
        logits, features = model.forward_with_features(images, stages)
        torch.testing.assert_close(logits, model(images))
    assert set(features) == set(stages)
    for stage, feature in features.items():
        assert feature.shape[1] == info[stage]["num_chs"]
        assert feature.shape[-1] == size // info[stage]["reduction"]


def test_fitnet_binds_timm_models_of_different_widths_and_strides():
    torch.manual_seed(0)
    student = Classifier(timm.create_model("resnet18", num_classes=10), RGB)
    teacher = FrozenTeacher(Classifier(timm.create_model("resnet34", num_classes=10), RGB))
    loss = FitNet(student_stage=2, teacher_stage=3)  # 128 channels at stride 8 -> 256 at stride 16
    loss.bind(student, teacher)
    assert tuple(loss.adapter.weight.shape) == (256, 128, 1, 1)
    images = torch.rand(2, 3, 32, 32)
    teacher_logits, teacher_features = teacher.forward_with_features(images, (3,))
    student_logits, student_features = student.forward_with_features(images, (2,))
    from kd.losses import Features

    value = loss(student_logits, teacher_logits, torch.tensor([1, 2]), Features(student_features, teacher_features))
    value.backward()
    assert torch.isfinite(value) and loss.adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


class RecordTeacherFeatures(FitNet):
    def __init__(self):
        super().__init__(student_stage=1, teacher_stage=1)
        self.teacher_features = []

    def compute_terms(self, student_logits, teacher_logits, target, features):
        self.teacher_features.append(features.teacher[self.teacher_stage])
        return super().compute_terms(student_logits, teacher_logits, target, features)


def test_fitnet_trains_its_adapter_and_checkpoints_it_outside_the_student(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "loss=fitnet", "sched.warmup_epochs=0")
    data = build_data(cfg, cfg.student)
    obtain = AutoWeights(cfg.paths.cache_dir, cfg.data, data, "cpu")
    teacher = build_teacher(cfg, data.num_classes, obtain)
    loss = RecordTeacherFeatures()
    module = DistillationModule(
        build_student(cfg.student, data.num_classes, obtain),
        loss,
        optimizer_factory(cfg),
        instantiate(cfg.sched),
        10,
        teacher,
    )
    adapter_before = loss.adapter.weight.detach().clone()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoints],
    )
    trainer.fit(module, datamodule=data)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in loss.adapter.parameters()} <= optimized
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not torch.equal(loss.adapter.weight.detach(), adapter_before)  # the adapter was trained
    assert len(loss.teacher_features) == 3
    assert all(not f.requires_grad and not f.is_inference() for f in loss.teacher_features)
    assert teacher.check_unchanged() == teacher.start_fingerprint

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert {"loss.adapter.weight", "loss.adapter.bias"} <= set(state)
    assert not any(k.startswith("teacher") for k in state)
    student_weights = read_state_dict(tmp_path / "last.ckpt")  # what eval/export take out of it
    assert not any("adapter" in k for k in student_weights)
    fresh = build_student(cfg.student, 10, obtain)
    load_into(fresh.net, student_weights, ("fc.",), "checkpoint")  # strict: exactly the student's keys
    torch.testing.assert_close(fresh.net.fc.weight, module.student.net.fc.weight)
