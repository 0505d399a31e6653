"""Features from any named module (loss.student_layers / loss.teacher_layers): timm, torchvision, a user's own
network and an ensemble member; read by forward hooks in the one forward pass that gives the logits; a ViT's tokens
turned into maps; unknown names refused with the closest ones; ``python -m kd.zoo layers``."""

from __future__ import annotations

import functools
import sys

import lightning as L
import pytest
import timm
import torch
import torchvision

from kd.data.digits import DigitsData
from kd.errors import KdError
from kd.losses import (
    AttentionTransfer,
    ContrastiveRepresentationKD,
    Features,
    FitNet,
    ProbabilisticKnowledgeTransfer,
    RelationalKD,
    ReviewKD,
    SimilarityPreserving,
)
from kd.models import Classifier, Preprocessing
from kd.module import DistillationModule
from kd.teachers import FrozenTeacher
from kd.teachers.ensemble import EnsembleTeacher
from kd.zoo import main as zoo_main
from tests.conftest import ROOT

DIGITS = Preprocessing(mean=(0.5,), std=(0.5,), input_size=(1, 8, 8), crop_pct=1.0)
RGB = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 8, 8), crop_pct=1.0)


def tiny_vit(seed: int = 1) -> Classifier:
    """A 3-block ViT on 8x8 images: 2x2 patches, a 4x4 grid, one class token."""
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=8, patch_size=2, depth=3, embed_dim=32, num_heads=2
    )
    return Classifier(vit, RGB)


def resnet_student(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(timm.create_model("resnet18", num_classes=10), RGB)


def torchvision_student(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(torchvision.models.resnet18(num_classes=10), RGB)


def user_student(seed: int = 0) -> Classifier:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from my_models import Net
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(seed)
    return Classifier(Net(num_classes=10, width=8), RGB)


class Recording(FitNet):
    """FitNet that keeps the feature maps it receives."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.received: list[Features] = []

    def compute_terms(self, student_logits, teacher_logits, target, features):
        self.received.append(features)
        return super().compute_terms(student_logits, teacher_logits, target, features)


def outputs_of(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))


def module_of(student: Classifier, teacher: FrozenTeacher, loss) -> DistillationModule:
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return DistillationModule(student, loss, optimizer, num_classes=10, teacher=teacher, channels_last=False)


@pytest.mark.parametrize(
    "make_student, layer",
    [(resnet_student, "layer3"), (torchvision_student, "layer3"), (user_student, "features.3")],
    ids=["timm-resnet", "torchvision-resnet", "user-net"],
)
def test_the_named_modules_output_is_what_fitnet_receives_from_one_forward_pass(make_student, layer):
    student, teacher = make_student(), FrozenTeacher(tiny_vit())
    loss = Recording(student_layers=[layer], teacher_layers=["blocks.1"])
    module = module_of(student, teacher, loss)
    student_outputs, teacher_outputs, student_passes = [], [], []
    handles = [
        outputs_of(dict(student.net.named_modules())[layer], student_outputs),
        outputs_of(teacher.model.net.blocks[1], teacher_outputs),
        student.net.register_forward_hook(lambda m, i, o: student_passes.append(1)),
    ]
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    module.train()
    module.training_step((images, labels), 0)
    for handle in handles:
        handle.remove()
    assert len(student_passes) == 1 and len(student_outputs) == 1 and len(teacher_outputs) == 1  # one pass each
    [features] = loss.received
    torch.testing.assert_close(features.student[layer].detach(), student_outputs[0])
    tokens = teacher_outputs[0]  # (4, 1 + 16, 32): the class token, then a 4x4 grid of patches
    assert tokens.shape == (4, 17, 32)
    by_hand = tokens[:, 1:].reshape(4, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(features.teacher["blocks.1"], by_hand)
    assert loss.adapter.in_channels == student_outputs[0].shape[1] and loss.adapter.out_channels == 32


@pytest.mark.parametrize(
    "make_student",
    [
        pytest.param(resnet_student, marks=pytest.mark.slow),
        pytest.param(torchvision_student, marks=pytest.mark.slow),
        user_student,
    ],
)
def test_fitnet_from_a_vit_block_into_a_named_student_layer_trains_end_to_end(make_student):
    layer = "features.3" if make_student is user_student else "layer3"
    student, teacher = make_student(), FrozenTeacher(tiny_vit())
    loss = FitNet(student_layers=[layer], teacher_layers=["blocks.2"], hint_weight=10.0)
    module = module_of(student, teacher, loss)
    data = DigitsData(batch_size=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    adapter_before = loss.adapter.weight.detach().clone()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    hint = float(loss.last_terms["hint"])
    assert hint > 0 and torch.isfinite(torch.tensor(hint))
    assert not torch.equal(loss.adapter.weight.detach(), adapter_before)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if v.is_floating_point())
    assert teacher.check_unchanged() == teacher.start_fingerprint


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: AttentionTransfer(student_layers=["layer2", "layer3"], teacher_layers=["blocks.0", "blocks.2"]),
        lambda: SimilarityPreserving(student_layers=["layer3"], teacher_layers=["blocks.2"]),
        lambda: ProbabilisticKnowledgeTransfer(student_layers=["layer3"], teacher_layers=["blocks.2"]),
        lambda: RelationalKD(student_layers=["layer3"], teacher_layers=["blocks.2"]),
        lambda: ContrastiveRepresentationKD(num_negatives=8, student_layers=["layer3"], teacher_layers=["blocks.2"]),
        lambda: ReviewKD(student_layers=["layer2", "layer3"], teacher_layers=["blocks.0", "blocks.2"]),
    ],
    ids=["at", "sp", "pkt", "rkd", "crd", "reviewkd"],
)
def test_every_feature_loss_reads_named_layers_and_gives_the_student_a_gradient(make_loss):
    student, teacher, loss = torchvision_student(), FrozenTeacher(tiny_vit()), make_loss()
    loss.bind(student, teacher)
    loss.bind_data(8)
    stages = loss.feature_stages()
    assert all(isinstance(key, str) for key in stages.student + stages.teacher)
    images = torch.rand(8, 1, 8, 8)
    teacher_logits, teacher_maps = teacher.forward_with_features(images, stages.teacher)
    student_logits, student_maps = student.forward_with_features(images, stages.student)
    assert set(teacher_maps) == set(stages.teacher) and all(m.shape[1:] == (32, 4, 4) for m in teacher_maps.values())
    value = loss(
        student_logits, teacher_logits, torch.arange(8) % 10, Features(student_maps, teacher_maps, torch.arange(8))
    )
    value.backward()
    assert torch.isfinite(value)
    assert student.net.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_an_ensemble_members_layer_is_read_in_that_members_pass():
    vit, cnn = FrozenTeacher(tiny_vit(1)), FrozenTeacher(resnet_student(2))
    ensemble = EnsembleTeacher([vit, cnn], ["timm:vit_tiny_patch16_224", "resnet"])
    images = torch.rand(2, 3, 8, 8)
    logits, maps = ensemble.forward_with_features(images, ("timm:vit_tiny_patch16_224/blocks.1", "1/layer2"))
    torch.testing.assert_close(logits, ensemble(images))
    _, own = vit.forward_with_features(images, ("blocks.1",))
    torch.testing.assert_close(maps["timm:vit_tiny_patch16_224/blocks.1"], own["blocks.1"])
    assert maps["1/layer2"].shape == (2, 128, 1, 1)
    loss = FitNet(student_layers=["layer3"], teacher_layers=["resnet/layer3"])
    loss.bind(torchvision_student(), ensemble)
    assert loss.feature_stages().teacher == ("resnet/layer3",) and loss.adapter.out_channels == 256
    with pytest.raises(KdError, match="names member 'convnext', which teacher=ensemble lacks; write MEMBER/LAYER"):
        FitNet(student_layers=["layer3"], teacher_layers=["convnext/stages.2"]).bind(torchvision_student(), ensemble)


def test_an_unknown_layer_is_refused_with_the_closest_names():
    with pytest.raises(KdError) as refused:
        FitNet(student_layers=["layer_3"], teacher_layers=["blocks.1"]).bind(torchvision_student(), tiny_vit())
    message = str(refused.value)
    assert message.startswith("loss.student_layers has 'layer_3', which is no module of the student (ResNet); did ")
    assert "layer3" in message and "python -m kd.zoo layers MODEL" in message and len(message) < 300
    with pytest.raises(KdError, match=r"loss.teacher_layers has 'block.1', .* did you mean blocks.1"):
        AttentionTransfer(student_layers=["layer3"], teacher_layers=["block.1"]).bind(resnet_student(), tiny_vit())


def test_zoo_layers_prints_module_names_and_output_shapes(capsys):
    assert zoo_main(["layers", "torchvision:resnet18", "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("torchvision:resnet18: input 3x64x64")
    assert any(line.split()[:3] == ["layer3", "Sequential", "1x256x4x4"] for line in printed.splitlines())
    assert zoo_main(["layers", "resnt18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err
