"""teacher.precision: bf16 autocast where the hardware computes bf16 natively, float32 elsewhere, float32 logits."""

import logging

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import kd.training.precision as precision_module
from kd.errors import KdError
from kd.models import Classifier
from kd.models.classifier import Preprocessing
from kd.models.convnet import ConvNet
from kd.module import DistillationModule
from kd.tasks.common import build_data, optimizer_factory
from kd.teachers import FrozenTeacher
from kd.teachers.precision import resolve_precision, teacher_precision
from kd.training.precision import native_bf16
from tests.conftest import FAST
from tests.teachers.test_teacher_cache import open_cache


def small_classifier(width=16, depth=4, seed=0):
    torch.manual_seed(seed)
    return Classifier(ConvNet(10, 1, width, depth), Preprocessing((0.3,), (0.4,), (1, 8, 8)))


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch):
    """This machine's capability forced on or off, so both branches run on any machine."""
    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: request.param)
    return request.param


def test_auto_is_bf16_autocast_where_native_and_float32_elsewhere_with_float32_logits(native, caplog):
    images = torch.rand(64, 1, 8, 8)
    exact = FrozenTeacher(small_classifier(), precision="32")(images)
    auto = FrozenTeacher(small_classifier())
    with caplog.at_level(logging.INFO, logger="kd"):
        first, second = auto(images), auto(images)
    assert first.dtype == second.dtype == torch.float32 and torch.equal(first, second)
    if native:  # bf16 rounding moves the logits a little, never the predictions of this net
        assert not torch.equal(first, exact) and torch.allclose(first, exact, atol=0.05, rtol=0.02)
        assert torch.equal(first.argmax(1), exact.argmax(1))
    else:
        assert torch.equal(first, exact)
    said = [r.getMessage() for r in caplog.records if "the teacher runs in" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("the teacher runs in " + ("bf16 autocast" if native else "float32"))


def test_explicit_precisions_hold_under_the_trainers_autocast():
    images = torch.rand(16, 1, 8, 8)
    exact = FrozenTeacher(small_classifier(), precision="32")(images)
    as_bf16 = FrozenTeacher(small_classifier(), precision="bf16")(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what trainer.precision=bf16-mixed opens around a step
        assert torch.equal(FrozenTeacher(small_classifier(), precision="32")(images), exact)
        assert torch.equal(FrozenTeacher(small_classifier(), precision="bf16")(images), as_bf16)
    assert not torch.equal(as_bf16, exact)


def test_feature_maps_come_back_float32_too():
    teacher = FrozenTeacher(small_classifier(), precision="bf16")
    logits, features = teacher.forward_with_features(torch.rand(4, 1, 8, 8), (1, 2))
    assert logits.dtype == torch.float32 and {f.dtype for f in features.values()} == {torch.float32}


def test_bad_or_impossible_precisions_are_refused_in_one_sentence():
    assert [teacher_precision(v) for v in (32, 16, "bf16", "AUTO")] == ["32", "16", "bf16", "auto"]
    with pytest.raises(KdError, match=r"^teacher.precision=fp8 is unknown; use auto, 32, bf16 or 16 \(16 on GPUs"):
        FrozenTeacher(small_classifier(), precision="fp8")
    with pytest.raises(KdError, match="teacher.precision=16 runs on GPUs only; use teacher.precision=bf16 or auto"):
        FrozenTeacher(small_classifier(), precision="16")(torch.rand(2, 1, 8, 8))
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "32")


def test_the_teachers_validation_metrics_come_from_the_outputs_the_loss_gets(make_cfg, native):
    cfg = make_cfg("student.weights=none")
    data = build_data(cfg, cfg.student)
    arch = instantiate(cfg.student.arch)
    teacher = FrozenTeacher(small_classifier(width=8, depth=2))
    module = DistillationModule(
        Classifier(arch.build(10), arch.preprocessing()), instantiate(cfg.loss), optimizer_factory(cfg), None, 10,
        teacher,
    )  # fmt: skip
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    images, labels = map(torch.cat, zip(*[(b[0], b[1]) for b in data.val_dataloader()], strict=True))
    reference = FrozenTeacher(small_classifier(width=8, depth=2), precision="bf16" if native else "32")(images)
    assert metrics["teacher/top1"] == pytest.approx((reference.argmax(1) == labels).float().mean().item(), abs=1e-6)


def test_the_cache_identity_includes_a_reduced_precision_only(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: False)
    base = [*FAST, f"teacher.cache={tmp_path}"]
    auto, written = open_cache(make_cfg(*base))
    assert written == [0] and "precision" not in auto.identity["teacher"]  # float32 caches keep their keys
    fp32, written = open_cache(make_cfg(*base, "teacher.precision=32"))
    assert (fp32.folder, written) == (auto.folder, [])
    bf16, written = open_cache(make_cfg(*base, "teacher.precision=bf16"))
    assert written == [0] and bf16.folder != auto.folder and bf16.identity["teacher"]["precision"] == ["bf16"]
    stored = [store.lookup(torch.tensor([[i, 0] for i in range(8)])) for store in (auto, bf16)]
    assert not torch.equal(*stored) and torch.equal(stored[0].argmax(1), stored[1].argmax(1))
