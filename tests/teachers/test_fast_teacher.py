"""The teacher's fast path: channels-last, autocast under trainer.precision, torch.compile."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from kd.models import Classifier
from kd.models.classifier import Preprocessing
from kd.models.convnet import ConvNet
from kd.module import DistillationModule
from kd.tasks.common import build_data, optimizer_factory
from kd.teachers import FrozenTeacher


def small_classifier(width=16, depth=4, seed=0):
    torch.manual_seed(seed)
    return Classifier(ConvNet(10, 1, width, depth), Preprocessing((0.3,), (0.4,), (1, 8, 8)))


def test_channels_last_changes_neither_outputs_nor_fingerprint():
    images = torch.rand(32, 1, 8, 8)
    plain = FrozenTeacher(small_classifier(), channels_last=False)
    fast = FrozenTeacher(small_classifier(), channels_last=True)
    assert fast.start_fingerprint == plain.start_fingerprint
    assert next(fast.model.net.features.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(images), plain(images), atol=1e-5)
    assert fast.check_unchanged() == plain.start_fingerprint


def test_half_precision_inputs_reach_a_float32_teacher():
    # trainer.precision=bf16-true hands the training step bfloat16 images; the teacher keeps its weights.
    teacher = FrozenTeacher(small_classifier())
    images = torch.rand(4, 1, 8, 8).bfloat16()
    assert torch.allclose(teacher(images), teacher(images.float()), atol=1e-6)


class RecordTeacherDtype(L.Callback):
    def __init__(self, module):
        self.dtypes = []
        teacher = module.teacher
        forward = teacher.forward_with_features

        def recording(images, stages=()):
            logits, features = forward(images, stages)
            self.dtypes.append((logits.dtype, torch.is_autocast_enabled("cpu")))
            return logits, features

        teacher.forward_with_features = recording


def test_under_the_trainers_bf16_autocast_the_teacher_hands_the_loss_float32_logits(make_cfg):
    cfg = make_cfg("student.weights=none")
    data = build_data(cfg, cfg.student)
    arch = instantiate(cfg.student.arch)
    module = DistillationModule(
        Classifier(arch.build(10), arch.preprocessing()),
        instantiate(cfg.loss),
        optimizer_factory(cfg),
        None,
        10,
        FrozenTeacher(small_classifier()),
    )
    recorder = RecordTeacherDtype(module)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    assert recorder.dtypes == [(torch.float32, True)] * 2  # computed under autocast (teacher.precision), upcast


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_outputs():
    eager = FrozenTeacher(small_classifier(width=8, depth=2))
    compiled = FrozenTeacher(small_classifier(width=8, depth=2), compile=True)
    assert compiled.start_fingerprint == eager.start_fingerprint  # the compiled graph is not a second copy
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.rand(16, 1, 8, 8)
    assert torch.allclose(compiled(images), eager(images), atol=1e-5)
    assert compiled.check_unchanged() == eager.start_fingerprint


@pytest.mark.slow
def test_compiled_teacher_is_frozen_into_its_graph_without_changing_global_config(monkeypatch):
    import torch._inductor.config as inductor_config
    import torch._inductor.freezing as freezing

    frozen_graphs = []
    real_freeze = freezing.freeze

    def spy(*args, **kwargs):
        frozen_graphs.append(args)
        return real_freeze(*args, **kwargs)

    monkeypatch.setattr(freezing, "freeze", spy)
    teacher = FrozenTeacher(small_classifier(width=8, depth=2), compile=True)
    eager = FrozenTeacher(small_classifier(width=8, depth=2))
    images = torch.rand(16, 1, 8, 8)
    with inductor_config.patch(fx_graph_cache=False):  # a cached graph from another test would skip the compile
        logits = teacher(images)
    assert frozen_graphs, "the teacher's graph was compiled without inductor's freezing"
    assert inductor_config.freezing is False  # set around the teacher's calls only
    assert torch.allclose(logits, eager(images), atol=1e-5)
