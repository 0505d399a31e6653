"""The final student's deployment speed: parameters, FLOPs, latency, in results.json and the sweep summary."""

import json

import pytest
from PIL import Image
from torch import nn

from kd.models import Classifier
from kd.models.classifier import Preprocessing
from kd.students.speed import count_flops, count_parameters, student_speed
from kd.summary import write_summary
from kd.tasks.train import fit


def conv_then_linear() -> Classifier:
    # 3x8x8 -> conv 3x3 (8 channels, padding 1, no bias) -> 8x8x8 -> flatten -> linear to 10 classes
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    return Classifier(net, Preprocessing((0.5,) * 3, (0.25,) * 3, (3, 8, 8)))


def test_flops_and_parameters_equal_a_hand_count():
    model = conv_then_linear()
    conv_macs = (8 * 8) * 8 * (3 * 3 * 3)  # output pixels x output channels x (kernel area x input channels)
    linear_macs = (8 * 8 * 8) * 10
    assert count_flops(model, (3, 8, 8)) == 2 * (conv_macs + linear_macs)  # 2 FLOPs per multiply-add
    assert count_parameters(model) == 8 * 3 * 3 * 3 + 8 * 8 * 8 * 10 + 10


def test_speed_fields_are_present_and_plausible():
    model = conv_then_linear()
    speed = student_speed(model, (3, 8, 8), budget_s=0.05)
    eager = speed["eager"]
    assert speed["parameters"] == count_parameters(model) and speed["flops_per_image"] == count_flops(model, (3, 8, 8))
    assert speed["device"] == "cpu" and speed["input_size"] == [3, 8, 8]
    assert 0 < eager["batch1_ms_per_image"] < 1000 and 0 < eager["batch64_images_per_s"] < 1e8
    # A batch of 64 amortizes the per-call cost: more images per second than one at a time.
    assert eager["batch64_images_per_s"] > 1000 / eager["batch1_ms_per_image"]


@pytest.mark.slow  # two short digits runs: ~15 s on a quiet 2-core CPU
def test_a_distillation_run_records_its_students_speed_unless_told_not_to(make_cfg, tmp_path):
    run = [
        "teacher.weights=none",
        "student.weights=none",
        "trainer.max_epochs=1",
        "sched.warmup_epochs=0",
        "logger=none",
    ]
    fit(make_cfg(*run, "student.measure_speed=true"), task="distill")
    speed = json.loads((tmp_path / "out" / "results.json").read_text())["student_speed"]
    assert speed["input_size"] == [1, 8, 8] and speed["parameters"] > 0 and speed["flops_per_image"] > 0
    assert speed["eager"]["batch1_ms_per_image"] > 0
    fit(make_cfg(*run, "student.measure_speed=false"), task="distill")
    assert "student_speed" not in json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.parametrize("measured", [True, False])
def test_the_summary_shows_latency_and_flops_and_plots_accuracy_against_latency(tmp_path, measured):
    for job, (student, top1, ms) in enumerate([("resnet8", 0.6, 0.5), ("resnet20", 0.7, 1.5)]):
        folder = tmp_path / str(job)
        folder.mkdir()
        speed = {"student_speed": {"flops_per_image": 2e7 * (job + 1), "eager": {"batch1_ms_per_image": ms}}}
        results = {"task": "distill", "student": student, "metrics": {"student/top1": top1}, "wall_time_s": 1.0}
        overrides = [f"student={student}"]
        (folder / "results.json").write_text(
            json.dumps({**results, **(speed if measured else {}), "overrides": overrides})
        )
    summary = write_summary(tmp_path)
    header = summary.markdown.splitlines()[0]
    assert ("student ms/image" in header) == measured
    if measured:
        row = next(line for line in summary.markdown.splitlines() if "resnet20" in line)
        assert row.rstrip(" |").endswith("| 1.50 | 40.0")
    width, _ = Image.open(tmp_path / "summary.png").size
    assert width == (17 if measured else 12) * 80  # a third panel: accuracy against latency
