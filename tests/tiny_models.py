"""Small real models for loss and module tests: kd's ConvNet as student and as a frozen teacher."""

from __future__ import annotations

import torch

from kd.losses import DistillationLoss, Features
from kd.models import Classifier, Preprocessing
from kd.models.convnet import ConvNet
from kd.teachers import FrozenTeacher

PREPROCESSING = Preprocessing(mean=(0.3,), std=(0.4,), input_size=(1, 8, 8), crop_pct=1.0)


def tiny_student(num_classes: int = 10, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ConvNet(num_classes, in_chans=1, width=4, depth=2), PREPROCESSING)


def tiny_teacher(num_classes: int = 10, seed: int = 1) -> FrozenTeacher:
    torch.manual_seed(seed)
    return FrozenTeacher(Classifier(ConvNet(num_classes, in_chans=1, width=8, depth=4), PREPROCESSING))


def loss_on_images(loss: DistillationLoss, images: torch.Tensor, target: torch.Tensor, seed: int = 0):
    """Bind ``loss`` to a tiny student and teacher and evaluate it on ``images`` the way the module does.
    Returns the loss value, the student logits and the student features (all part of the graph)."""
    student, teacher = tiny_student(seed=seed), tiny_teacher(seed=seed + 1)
    loss.bind(student, teacher)
    loss.bind_data(len(images))  # the images are the whole training set: indices 0..N-1 (CRD's memories)
    stages = loss.feature_stages()
    teacher_logits, teacher_features = teacher.forward_with_features(images, stages.teacher)
    student_logits, student_features = student.forward_with_features(images, stages.student)
    indices = torch.arange(len(images))
    value = loss(student_logits, teacher_logits, target, Features(student_features, teacher_features, indices))
    return value, student_logits, student_features


class NormFreeConvNet(torch.nn.Module):
    """The digits student without BatchNorm (conv-ReLU blocks, average pooling, a linear head): its output for an
    image does not depend on the other images of the batch, so a batch split over processes computes the same
    thing as the whole batch in one (torch's SyncBatchNorm, which would restore that for BatchNorm, is GPU-only)."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for index in range(depth):
            layers += [torch.nn.Conv2d(in_chans if index == 0 else width, width, 3, padding=1), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))
