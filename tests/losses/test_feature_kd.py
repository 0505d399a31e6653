"""An embedding teacher (no classifier: timm's num_classes=0) and loss=feature_kd: the formula, the learned projector,
label-free training on unlabeled images with the teacher frozen, and logit losses refused."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

from kd.data.digits import DigitsData
from kd.data.unlabeled import UNLABELED
from kd.errors import KdError
from kd.losses import FeatureKD, Features, HintonKD
from kd.models import Classifier, Preprocessing
from kd.module import DistillationModule
from kd.tasks.models import build_teacher
from kd.teachers import FrozenTeacher
from tests.tiny_models import tiny_student

RGB = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 8, 8), crop_pct=1.0)
TINY_VIT = {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 24, "num_heads": 2}


def embedding_teacher(seed: int = 1) -> FrozenTeacher:
    torch.manual_seed(seed)
    return FrozenTeacher(Classifier(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT), RGB))


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_feature_kd_projects_the_pooled_student_features_onto_the_teachers_embedding(distance):
    student, teacher = tiny_student(), embedding_teacher()
    assert teacher.embedding
    loss = FeatureKD(distance=distance)
    loss.bind(student, teacher)
    assert isinstance(loss.projector, torch.nn.Linear) and loss.projector.out_features == 24  # the ViT's width
    images = torch.rand(5, 1, 8, 8)
    stages = loss.feature_stages()
    embeddings, _ = teacher.forward_with_features(images, stages.teacher)
    assert embeddings.shape == (5, 24)
    logits, maps = student.forward_with_features(images, stages.student)
    value = loss(logits, embeddings, torch.full((5,), UNLABELED), Features(maps, {}))
    projected = loss.projector(maps[stages.student[0]].mean(dim=(2, 3)))
    if distance == "cosine":
        by_hand = (1 - F.cosine_similarity(projected, embeddings, dim=1)).mean()
    else:
        by_hand = ((projected - embeddings) ** 2).mean()
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-5)
    value.backward()
    assert loss.projector.weight.grad.abs().sum() > 0 and student.net.fc.weight.grad is None  # no label: no head grad


def test_feature_kd_onto_a_named_teacher_layer_uses_a_1x1_projector():
    student, teacher = tiny_student(), embedding_teacher()
    loss = FeatureKD(student_layers=["features.1"], teacher_layers=["blocks.1"])
    loss.bind(student, teacher)
    assert isinstance(loss.projector, torch.nn.Conv2d) and loss.projector.out_channels == 24


@pytest.mark.slow
def test_an_embedding_teacher_teaches_on_unlabeled_images_and_stays_frozen():
    student, teacher = tiny_student(), embedding_teacher()
    module = DistillationModule(
        student, FeatureKD(), functools.partial(torch.optim.SGD, lr=0.1), num_classes=10, teacher=teacher
    )
    data = DigitsData(batch_size=32, labeled_fraction=0.1)  # 90% of the training images carry no label
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=12, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the student moves towards the teacher
    assert teacher.check_unchanged() == teacher.start_fingerprint
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    assert "student/top1" in metrics and not any(key.startswith("teacher/") for key in metrics)


def test_a_logit_loss_with_an_embedding_teacher_is_refused_in_one_sentence():
    with pytest.raises(KdError) as refused:
        DistillationModule(tiny_student(), HintonKD(), num_classes=10, teacher=embedding_teacher())
    message = str(refused.value)
    assert "compares class predictions, but the teacher has no classifier" in message and "feature_kd" in message


def test_teacher_arch_num_classes_0_builds_an_embedding_teacher_from_config(make_cfg):
    cfg = make_cfg(
        "teacher=timm", "teacher.model=vit_tiny_patch16_224", "teacher.weights=none", "+teacher.arch.num_classes=0",
        *(f"+teacher.arch.{k}={v}" for k, v in TINY_VIT.items()), "loss=feature_kd",
        "+teacher.arch.data_config={input_size:[3,8,8]}",
    )  # fmt: skip
    teacher = build_teacher(cfg, 10)
    assert teacher.embedding and teacher(torch.rand(2, 1, 8, 8)).shape == (2, 24)
