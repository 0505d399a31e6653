"""Any teacher, any student: timm and torchvision models by name, the user's own module, ensembles, and pairs
whose input sizes differ. Real timm / torchvision architectures (timm's tiny ``test_*`` models), random weights."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from kd.data.mixup import BatchMixup
from kd.data.sampling import SeededViews
from kd.errors import KdError
from kd.launch.preflight import refuse_bad_command_line
from kd.losses import HintonKD
from kd.models import TimmArch, TorchvisionArch
from kd.module import DistillationModule
from kd.tasks.models import build_student, build_teacher, cache_settings, model_spec
from kd.tasks.train import distill
from kd.teachers.ensemble import EnsembleTeacher
from kd.teachers.fill import teacher_identity
from kd.weights.names import model_record
from tests.conftest import ROOT, run_cli

# float32: timm's test_resnet reaches 1x1 maps at 32 px, where PyTorch's CPU bf16 convolution (trainer.precision=auto
# on this CPU) can return NaN weight gradients now and then (docs/troubleshooting.md)
TINY = [
    "data=fake", "data.num_classes=10", "data.image_size=32", "data.train_size=16", "data.val_size=8",
    "data.batch_size=8", "trainer.max_epochs=1", "sched.warmup_epochs=0", "logger=none", "trainer.precision=32-true",
]  # fmt: skip
PAIR = ["teacher=timm", "teacher.model=test_convnext", "teacher.weights=none"]
PAIR += ["student=timm", "student.model=test_resnet", "student.weights=none"]
ENSEMBLE = [
    "teacher=ensemble", "teacher.members=[timm:test_resnet,timm:test_efficientnet]",
    "+teacher.member_overrides.0.weights=none", "+teacher.member_overrides.1.weights=none",
]  # fmt: skip


@pytest.mark.slow
def test_a_tiny_pair_of_two_timm_families_distills_by_name_and_records_both(make_cfg, tmp_path):
    results = distill(make_cfg(*TINY, *PAIR))
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["teacher"] == "timm" and written["student"] == "timm"  # the options, as before
    assert written["teacher_model"] == {
        "name": "test_convnext",
        "arch": "test_convnext",
        "backend": "timm",
        "weights": "none",
    }
    assert written["student_model"]["arch"] == "test_resnet"
    card = json.loads((tmp_path / "out" / "student.json").read_text())
    assert card["model"] == "test_resnet" and card["teacher"] == "test_convnext"
    assert results["teacher_fingerprint"]["start"] == results["teacher_fingerprint"]["end"]


def test_the_record_names_the_real_architecture_and_weights(make_cfg):
    record = model_record(
        model_spec(make_cfg("teacher=timm", "teacher.model=convnext_tiny.fb_in22k_ft_in1k").teacher, "teacher")
    )
    assert record == {
        "name": "convnext_tiny.fb_in22k_ft_in1k",
        "arch": "convnext_tiny",
        "backend": "timm",
        "weights": "convnext_tiny.fb_in22k_ft_in1k",
    }
    # The old workaround: overriding the architecture of a zoo entry records the architecture built.
    record = model_record(
        model_spec(make_cfg("teacher=resnet50_vd", "teacher.arch.model_name=resnet34d").teacher, "teacher")
    )
    assert record["arch"] == "resnet34d" and record["weights"] == "resnet34d.ra2_in1k"
    record = model_record(
        model_spec(make_cfg("student=torchvision", "student.model=regnet_y_400mf.IMAGENET1K_V2").student, "student")
    )
    assert record["name"] == "regnet_y_400mf.IMAGENET1K_V2" and record["weights"] == "IMAGENET1K_V2"


def test_a_name_keeps_its_backends_preprocessing_and_a_tag_picks_the_weights(make_cfg):
    cfg = make_cfg("teacher=timm", "teacher.model=convnext_tiny.fb_in22k_ft_in1k_384")
    pre = instantiate(cfg.teacher.arch).preprocessing()
    assert pre.input_size == (3, 384, 384) and pre.interpolation == "bicubic" and pre.crop_pct == 1.0
    tv = instantiate(make_cfg("teacher=torchvision", "teacher.model=regnet_y_400mf.IMAGENET1K_V2").teacher.arch)
    assert tv.preprocessing().crop_pct == 224 / 232  # V2 weights: resize 232, crop 224 (V1: 256)
    assert TorchvisionArch("regnet_y_400mf.IMAGENET1K_V1").preprocessing().crop_pct == 224 / 256


def test_hub_and_local_dir_models_load_through_timm(make_cfg, tmp_path):
    """``local-dir:`` is read by the same timm code as ``hf-hub:`` (config.json + weights), without a network."""
    from timm.models import save_for_hf

    source = timm.create_model("test_resnet", num_classes=10)
    save_for_hf(source, tmp_path / "hub")
    student = build_student(make_cfg("student=timm", f"student.model=local-dir:{tmp_path / 'hub'}").student, 10)
    assert all(torch.equal(student.net.state_dict()[k], v) for k, v in source.state_dict().items())
    # The same folder as the weights of a zoo-style entry: the resolver's hub branch.
    cfg = make_cfg("student=timm", "student.model=test_resnet", f"student.weights=local-dir:{tmp_path / 'hub'}")
    again = build_student(cfg.student, 10)
    assert all(torch.equal(again.net.state_dict()[k], v) for k, v in source.state_dict().items())


def test_the_users_own_module_by_target(make_cfg):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        cfg = make_cfg(
            "student=custom", "student.net._target_=my_models.Net", "+student.net.width=4",
            "student.mean=[0.5,0.5,0.5]", "student.std=[0.25,0.25,0.25]", "student.input_size=[3,32,32]",
        )  # fmt: skip
        student = build_student(cfg.student, 7)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert student.net.head.out_features == 7 and student.net.head.in_features == 8
    assert student.preprocessing.mean == (0.5, 0.5, 0.5) and student.preprocessing.input_size == (3, 32, 32)
    assert model_record(model_spec(cfg.student, "student"))["name"] == "my_models.Net(width=4)"


@pytest.mark.slow
def test_the_readme_custom_module_command_runs(tmp_path, cache_dir):
    result = run_cli(
        "teacher=timm", "teacher.model=test_resnet", "teacher.weights=none",
        "student=custom", "student.net._target_=my_models.Net", "+student.net.width=8",
        "student.mean=[0.5,0.5,0.5]", "student.std=[0.25,0.25,0.25]", "student.input_size=[3,32,32]", *TINY,
        cwd=tmp_path, cache_dir=cache_dir, extra_env={"PYTHONPATH": str(ROOT / "examples")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["student_model"]["arch"] == "my_models.Net(width=8)"
    assert "the teacher sees the student's 32x32 view resized to its own 160x160" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_a_two_member_ensemble_distills_and_records_two_unchanged_fingerprints(make_cfg, tmp_path):
    results = distill(make_cfg(*TINY, *ENSEMBLE, "student=timm", "student.model=test_resnet", "student.weights=none"))
    members = results["teacher_fingerprint"]["members"]
    assert [m["name"] for m in members] == ["timm:test_resnet", "timm:test_efficientnet"]
    assert all(m["start"] == m["end"] for m in members) and members[0]["start"] != members[1]["start"]
    assert {"teacher/0/top1", "teacher/1/top1", "teacher/top1"} <= set(results["metrics"])
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["arch"] for m in written["teacher_model"]["members"]] == ["test_resnet", "test_efficientnet"]


def ensemble_of(make_cfg, *extra: str) -> EnsembleTeacher:
    torch.manual_seed(0)
    return build_teacher(make_cfg(*ENSEMBLE, "student=timm", "student.model=test_resnet", *extra), 10)


def test_an_ensemble_averages_probabilities_or_logits_with_weights(make_cfg):
    images = torch.rand(3, 3, 32, 32)
    ensemble = ensemble_of(make_cfg, "teacher.weights_per_member=[3,1]")
    first, second = (member(images) for member in ensemble.members)
    expected = 0.75 * first.softmax(1) + 0.25 * second.softmax(1)
    assert torch.allclose(ensemble(images).softmax(1), expected, atol=1e-6)
    by_logits = ensemble_of(make_cfg, "teacher.weights_per_member=[3,1]", "teacher.combine=logits")
    assert torch.allclose(by_logits(images), 0.75 * first + 0.25 * second, atol=1e-5)


def test_the_cache_identity_names_every_member(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, *ENSEMBLE, "student=timm", "student.model=test_resnet", f"teacher.cache={tmp_path}")
    from kd.tasks.common import build_data

    data = build_data(cfg, cfg.student)
    views = SeededViews(data.train_set, 0)
    identity = teacher_identity(cache_settings(cfg), ensemble_of(make_cfg), data, views, 10)
    members = identity["teacher"]["ensemble"]["members"]
    assert [m["name"] for m in members] == ["timm:test_resnet", "timm:test_efficientnet"]
    other = teacher_identity(cache_settings(cfg), ensemble_of(make_cfg, "teacher.combine=logits"), data, views, 10)
    assert other["teacher"]["ensemble"]["combine"] == "logits"


def test_an_ensemble_refuses_feature_losses_and_bad_settings(make_cfg):
    from kd.tasks.checks import check_ensemble

    cfg = make_cfg(*ENSEMBLE, "loss=fitnet")
    with pytest.raises(KdError, match="teacher=ensemble has one set per member; use a logit loss"):
        check_ensemble(cfg, instantiate(cfg.loss))
    with pytest.raises(KdError, match=r"teacher.weights_per_member=\[1\] must give 2"):
        ensemble_of(make_cfg, "teacher.weights_per_member=[1]")
    with pytest.raises(KdError, match="teacher.combine=max is unknown"):
        ensemble_of(make_cfg, "teacher.combine=max")


def test_a_larger_teacher_sees_the_students_crop_resized_not_a_second_crop(make_cfg, tmp_path):
    """Image folder data: a RandomResizedCrop view per sample, mixup on top. The teacher (48 px) must get the
    very tensor the student (32 px) trains on, interpolated, not a view of its own."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for index in range(4):
                pixels = generator.integers(0, 256, (40, 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / label / f"{index}.png")
    cfg = make_cfg(
        "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.batch_size=8", "data.num_workers=0",
        "teacher=timm", "teacher.model=test_convnext", "teacher.weights=none",
        "+teacher.arch.data_config.input_size=[3,48,48]",
        "student=timm", "student.model=test_resnet", "student.weights=none",
        "+student.arch.data_config.input_size=[3,32,32]",
    )  # fmt: skip
    from kd.tasks.common import build_data

    data = build_data(cfg, cfg.student)
    teacher, student = build_teacher(cfg, 2), build_student(cfg.student, 2)
    assert teacher.resize_to == (48, 48)
    seen = {}
    student.net.register_forward_pre_hook(lambda _, args: seen.__setitem__("student", args[0].detach().clone()))
    teacher.model.net.register_forward_pre_hook(lambda _, args: seen.__setitem__("teacher", args[0].clone()))
    mixup = BatchMixup(mixup_alpha=0.8, seed=0, batch_size=8)
    module = DistillationModule(student, HintonKD(), None, None, 2, teacher, mixup)
    batch = next(iter(data.train_dataloader()))
    module.training_step(batch, 0)
    view = seen["student"] * student.std + student.mean  # the mixed, cropped batch in [0, 1]
    expected = teacher.model.normalize(F.interpolate(view, size=(48, 48), mode="bicubic", align_corners=False))
    assert seen["teacher"].shape[-2:] == (48, 48)
    assert torch.allclose(seen["teacher"].float(), expected, atol=1e-4)
    # Validation: the teacher is also measured on its own view, the folder's images resized and cropped for 48 px.
    from kd.teachers.views import own_view, teacher_view_metrics

    assert own_view(teacher, data)[0][0].shape == (3, 48, 48)
    assert "teacher/top1_own_view" in teacher_view_metrics(teacher, data, "cpu")


def refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        refuse_bad_command_line(list(argv))
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and len(line) <= 200, line
    return line


def test_unknown_names_are_refused_before_any_work_in_one_short_line(capsys):
    line = refusal(capsys, "teacher=resnet50vd")
    assert "did you mean resnet50_vd" in line and "teacher=timm teacher.model=NAME" in line
    assert "did you mean convnext_tiny" in refusal(capsys, "teacher=timm", "teacher.model=convnxt_tiny")
    assert "did you mean regnet_y_400mf" in refusal(capsys, "student=torchvision", "student.model=regnet_y_400")
    assert "did you mean convnext_tiny.fb_in22k" in refusal(
        capsys, "teacher=timm", "teacher.model=convnext_tiny.fb_in22"
    )
    assert "did you mean resnet50_vd" in refusal(capsys, "teacher=ensemble", "teacher.members=[resnet50vd,resnet18]")
    assert "add teacher.model=NAME" in refusal(capsys, "teacher=timm")
    assert "teachers only" in refusal(capsys, "student=ensemble")
    assert "cannot be imported" in refusal(capsys, "student=custom", "student.net._target_=nosuch_module.Net")
    with pytest.raises(KdError, match="did you mean convnext_tiny"):
        TimmArch("convnxt_tiny")  # the same refusal where a config names it (an experiment file)


def test_an_ensemble_fills_the_teacher_output_cache_with_mixup(make_cfg, tmp_path):
    from kd.tasks.cache_teacher import cache_teacher

    cfg = make_cfg(
        *TINY, *ENSEMBLE, "student=timm", "student.model=test_resnet", "mixup=mixup", f"teacher.cache={tmp_path / 'c'}"
    )
    results = cache_teacher(cfg, epochs=1)
    manifest = json.loads((tmp_path / "c" / results["cache"].split("/")[-1] / "manifest.json").read_text())
    assert [m["name"] for m in manifest["identity"]["teacher"]["ensemble"]["members"]] == [
        "timm:test_resnet",
        "timm:test_efficientnet",
    ]
    assert manifest["epochs"] == [0] and manifest["identity"]["mixup"] is not None
