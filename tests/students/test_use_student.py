"""The last mile: a distilled digits student evaluated, used for predictions and exported."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.students.card import CHECKPOINT_KEY, StudentCard, read_card
from kd.students.export import check_matches
from kd.tasks.evaluate import evaluate
from kd.tasks.export import export
from kd.tasks.models import build_student
from kd.tasks.predict import predict
from kd.tasks.train import distill
from tests.conftest import FAST, run_cli

DIGITS_CLASSES = [str(d) for d in range(10)]


def compose_cfg(out: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    fast = [o for o in FAST if not o.startswith("teacher.")] if "~teacher" in overrides else FAST
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", "logger=none", *fast, *overrides],
            return_hydra_config=True,
        )


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, cache_dir) -> Path:
    """The output folder of one short digits distillation, shared by this module's tests."""
    out = tmp_path_factory.mktemp("distilled")
    distill(
        compose_cfg(out, cache_dir, "trainer.max_epochs=1", "trainer.limit_train_batches=4", "sched.warmup_epochs=0")
    )
    return out


def test_every_training_run_saves_the_student_with_its_card(distilled, cache_dir, tmp_path):
    card = json.loads((distilled / "student.json").read_text())
    assert card["class_names"] == DIGITS_CLASSES and card["num_classes"] == 10
    assert card["input_size"] == [1, 8, 8] and card["mean"] == [0.305] and card["std"] == [0.376]
    assert card["crop_pct"] == 1.0 and card["model"] == "digits_student" and card["teacher"] == "digits_teacher"
    results = json.loads((distilled / "results.json").read_text())
    assert card["teacher_fingerprint"] == results["teacher_fingerprint"]["start"]
    checkpoint = torch.load(distilled / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY] == card
    # student.safetensors is the checkpoint's student alone, and student.weights=<it> loads it back bit-exactly.
    saved = load_file(distilled / "student.safetensors")
    prefix = "student.net."
    in_checkpoint = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    assert saved.keys() == in_checkpoint.keys()
    assert all(torch.equal(saved[k], in_checkpoint[k]) for k in saved)
    cfg = compose_cfg(tmp_path, cache_dir, f"student.weights={distilled / 'student.safetensors'}")
    reloaded = build_student(cfg.student, 10).net.state_dict()
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    assert read_card(distilled / "student.safetensors") == read_card(distilled / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("weights", ["checkpoints/last.ckpt", "student.safetensors"])
def test_eval_reproduces_the_metrics_of_the_training_run(distilled, cache_dir, tmp_path, weights):
    results = evaluate(compose_cfg(tmp_path, cache_dir, "task=eval", f"student.weights={distilled / weights}"))
    trained = json.loads((distilled / "results.json").read_text())["metrics"]
    expected = {k: v for k, v in trained.items() if not k.startswith("student_init/")}
    assert set(expected) >= {"student/top1", "student/top5", "student/ece", "teacher/top1", "teacher/ece", "agreement"}
    # Same weights, same validation images, same deterministic CPU kernels: the same numbers, exactly.
    assert results["metrics"] == expected
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["task"] == "eval" and written["teacher"] == "digits_teacher" and "loss" not in written
    assert written["teacher_fingerprint"] == json.loads((distilled / "student.json").read_text())["teacher_fingerprint"]


def test_eval_without_a_teacher(distilled, cache_dir, tmp_path):
    weights = distilled / "student.safetensors"
    results = evaluate(compose_cfg(tmp_path, cache_dir, "task=eval", "~teacher", f"student.weights={weights}"))
    assert set(results["metrics"]) == {"student/top1", "student/top5", "student/ece"}
    assert json.loads((tmp_path / "results.json").read_text())["teacher"] is None


def test_eval_refuses_weights_trained_for_other_classes(distilled, cache_dir, tmp_path):
    weights = distilled / "student.safetensors"
    cfg = compose_cfg(tmp_path, cache_dir, "task=eval", "~teacher", f"student.weights={weights}", "data=fake")
    with pytest.raises(KdError, match="predict 10 classes but the data has 1000"):
        evaluate(cfg)


def test_a_task_that_needs_a_teacher_says_so(cache_dir, tmp_path):
    with pytest.raises(KdError, match="needs a teacher"):
        distill(compose_cfg(tmp_path, cache_dir, "~teacher"))


def digit_pngs(folder: Path, count: int) -> tuple[list[Path], torch.Tensor]:
    """Digits saved as 8x8 grayscale PNGs, and the exact [0, 1] tensors they decode to."""
    digits = load_digits()
    folder.mkdir()
    pixels = (digits.images[:count] * 255 / 16).round().astype(np.uint8)
    paths = []
    for index, image in enumerate(pixels):
        paths.append(folder / f"digit{index:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths, torch.from_numpy(pixels).float().unsqueeze(1) / 255


def test_predict_gives_the_classes_the_student_predicts_in_process(distilled, cache_dir, tmp_path, capsys):
    paths, images = digit_pngs(tmp_path / "digits", 12)
    rgb = tmp_path / "digits" / "rgb" / "digit00.jpg.png"  # an RGB file in a subfolder: read as grayscale
    rgb.parent.mkdir()
    Image.open(paths[0]).convert("RGB").save(rgb)
    weights = distilled / "student.safetensors"
    cfg = compose_cfg(tmp_path / "out", cache_dir, "task=predict", f"student.weights={weights}")
    cfg.predict.inputs = str(tmp_path / "digits")
    predict(cfg)

    student = build_student(cfg.student, 10).eval()
    with torch.inference_mode():
        expected = student(images).softmax(dim=1).topk(5, dim=1)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [str(p) for p in paths] + [str(rgb)]
    for row, classes, probs in zip(rows, expected.indices.tolist(), expected.values.tolist(), strict=False):
        assert [row[f"class_{k}"] for k in range(1, 6)] == [str(c) for c in classes]
        assert [float(row[f"prob_{k}"]) for k in range(1, 6)] == pytest.approx(probs, abs=1e-6)
    assert rows[-1] == {**rows[0], "image": str(rgb)}
    printed = capsys.readouterr().out
    assert f"{paths[0]}: {rows[0]['class_1']} {100 * float(rows[0]['prob_1']):.2f}%" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == "predict" and results["images"] == 13 and "teacher" not in results


def test_predict_reports_bad_inputs(distilled, cache_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    weights = distilled / "student.safetensors"
    for inputs, message in [
        (None, "predict.inputs is not set"),
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path / "empty", "holds no image"),
        (tmp_path / "empty" / "notes.txt", "cannot be read"),
    ]:
        cfg = compose_cfg(tmp_path / "out", cache_dir, "task=predict", f"student.weights={weights}")
        cfg.predict.inputs = None if inputs is None else str(inputs)
        with pytest.raises(KdError, match=message):
            predict(cfg)
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated")
def test_export_round_trips_every_format(distilled, cache_dir, tmp_path):
    import onnxruntime

    weights = distilled / "student.safetensors"
    # The deployed student's speed, eager and through ONNX Runtime on the exported file.
    cfg = compose_cfg(tmp_path, cache_dir, "task=export", f"student.weights={weights}", "student.measure_speed=true")
    results = export(cfg)
    assert results["student_speed"]["onnx"]["batch1_ms_per_image"] > 0
    assert results["student_speed"]["eager"]["batch64_images_per_s"] > 0
    files = {fmt: Path(path) for fmt, path in results["files"].items()}
    assert set(files) == {"safetensors", "onnx", "torchscript", "card"}
    assert files["card"].read_text() == (distilled / "student.json").read_text()

    exported, original = load_file(files["safetensors"]), load_file(weights)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)

    student = build_student(cfg.student, 10).eval()
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(files["torchscript"]))
    for batch_size in (2, 7):
        images = torch.rand(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(batch_size))
        with torch.inference_mode():
            expected = student(images)
            from_script = scripted(images)
        from_onnx = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        torch.testing.assert_close(from_onnx, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(from_script, expected, rtol=0, atol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in files.values()} == {0o666 & ~umask}  # not mkstemp's 0600


def test_export_checks_formats_before_any_work(cache_dir, tmp_path):
    cfg = compose_cfg(tmp_path, cache_dir, "task=export", "student.weights=/nonexistent.safetensors")
    cfg.export.formats = ["onnx", "tflite"]
    with pytest.raises(KdError, match=r"export.formats=\['onnx', 'tflite'\] must list one or more of"):
        export(cfg)


def test_an_export_that_differs_from_pytorch_is_refused(distilled, cache_dir, tmp_path):
    cfg = compose_cfg(tmp_path, cache_dir, f"student.weights={distilled / 'student.safetensors'}")
    student = build_student(cfg.student, 10).eval()
    card = StudentCard.from_dict(json.loads((distilled / "student.json").read_text()))
    check_matches(lambda x: student(x).detach(), student, card, "onnx")  # identical: accepted
    with pytest.raises(KdError, match="differs from PyTorch by up to 0.001"):
        check_matches(lambda x: student(x).detach() + 1e-3, student, card, "onnx")
    with pytest.raises(KdError, match=r"gives logits of shape \(1, 10\) instead of \(3, 10\)"):
        check_matches(lambda x: student(x[:1]).detach(), student, card, "onnx")


@pytest.mark.slow
def test_predict_from_the_command_line(distilled, cache_dir, tmp_path):
    paths, _ = digit_pngs(tmp_path / "digits", 2)
    weights = distilled / "student.safetensors"
    result = run_cli(
        "task=predict", f"student.weights={weights}", f"predict.inputs={paths[1]}", cwd=tmp_path, cache_dir=cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith(str(paths[1]))]
    assert line.count("%") == 5
    with open(tmp_path / "predictions.csv") as f:
        [row] = list(csv.DictReader(f))
    assert line.startswith(f"{paths[1]}: {row['class_1']} ")
