"""The full-scale pairing, shrunk: ResNet152_vd teaches ResNet50_vd on tiny 1000-class fake data."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    teacher = folder / "resnet152_vd.safetensors"
    save_file(timm.create_model("resnet152d", num_classes=1000).state_dict(), str(teacher))
    student = folder / "resnet50_vd.pth"
    torch.save(timm.create_model("resnet50d", num_classes=1000).state_dict(), student)
    return teacher, student


@pytest.mark.slow
def test_resnet152_vd_distills_into_resnet50_vd_for_two_steps(tmp_path, cache_dir, weight_files):
    teacher, student = weight_files
    result = run_cli(
        "teacher=resnet152_vd",
        "student=resnet50_vd",
        "data=fake",
        "data.batch_size=4",
        "data.train_size=8",
        "data.val_size=4",
        "data.image_size=32",
        f"teacher.weights={teacher}",
        f"student.weights={student}",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "sched.warmup_epochs=0",
        "loss=soft_ce",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teacher"] == "resnet152_vd" and results["student"] == "resnet50_vd"
    assert results["loss"] == "soft_ce" and results["data"] == "fake"
    assert results["teacher_fingerprint"]["start"] == results["teacher_fingerprint"]["end"]
    for key in ("student/top1", "student/top5", "student_init/top1", "teacher/top1", "agreement"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # a python run.py process per case: over 10 s each
def test_missing_weights_file_stops_with_one_sentence(tmp_path, cache_dir):
    missing = tmp_path / "nowhere" / "resnet152_vd.pth"
    result = run_cli(
        "teacher=resnet152_vd",
        "student=resnet50_vd",
        "data=fake",
        f"teacher.weights={missing}",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: weights file {missing} does not exist; pass an existing file or a timm tag"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # a python run.py process per case: over 10 s each
def test_unreachable_timm_tag_says_how_to_give_weights(tmp_path, cache_dir, monkeypatch):
    result = run_cli(
        "teacher=resnet152_vd",
        "student=resnet50_vd",
        "data=fake",
        "teacher.weights=resnet152d.ra2_in1k",
        cwd=tmp_path,
        cache_dir=cache_dir,
        extra_env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: timm weights 'resnet152d.ra2_in1k' could not be downloaded")
    assert "weights=/path/to/file.safetensors" in last
