import json

from tests.conftest import FAST, run_cli


def test_default_run_distills_digits_and_writes_results(tmp_path, cache_dir):
    result = run_cli(*FAST, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: results[k] for k in ("task", "teacher", "student", "loss", "data", "seed")} == {
        "task": "distill",
        "teacher": "digits_teacher",
        "student": "digits_student",
        "loss": "kd",
        "data": "digits",
        "seed": 0,
    }
    metrics = results["metrics"]
    for key in ("student/top1", "student/top5", "student_init/top1", "teacher/top1", "agreement"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["teacher/top1"] > 0.5  # even a 3-epoch teacher learns digits
    fingerprint = results["teacher_fingerprint"]
    assert fingerprint["start"] == fingerprint["end"] and len(fingerprint["start"]) == 64
    assert results["wall_time_s"] > 0 and results["train_images_per_s"] > 0
    assert "student top-1 after" in result.stdout
    log = (tmp_path / "run.log").read_text()
    assert "no weights given, so trained it with task=train" in log or "reusing weights trained earlier" in log
    assert not list(tmp_path.glob(".results.json.*"))  # no temporary file left behind
    # Every run is on a dashboard: an offline wandb run (no API key here), ready for `wandb sync`.
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert "wandb sync" in result.stdout + result.stderr


def test_train_task_has_no_teacher_keys(tmp_path, cache_dir):
    result = run_cli(*FAST, "task=train", "student.weights=none", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "train" and results["loss"] == "ce"
    assert "teacher" not in results and "teacher_fingerprint" not in results
    assert not any(k.startswith(("teacher", "agreement")) for k in results["metrics"])
