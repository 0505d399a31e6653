import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, run_cli

LOSSES = ["soft_ce", "kd", "dml", "dkd", "dist", "ce", "fitnet", "kd_ce"]


def logged_columns(job: dict) -> set[str]:
    return set((Path(job["output_dir"]) / "csv" / "metrics.csv").read_text().splitlines()[0].split(","))


@pytest.mark.slow
def test_multirun_over_every_loss_runs_each_job_to_the_end(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        f"loss={','.join(LOSSES)}",
        *FAST,
        "logger=csv",  # a wandb run per sweep job: tests/results/test_dashboards.py
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        cache_dir=cache_dir,
        timeout=1800,  # eight jobs, seconds each on an idle machine; far slower on a shared one
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for path in sweep.glob("*/results.json"):
        job = json.loads(path.read_text())
        jobs[job["loss"]] = job
    assert sorted(jobs) == sorted(LOSSES)
    for loss, job in jobs.items():
        metrics = job["metrics"]
        assert 0.0 <= metrics["student/top1"] <= 1.0 and math.isfinite(metrics["student/top1"]), loss
        assert job["teacher_fingerprint"]["start"] == job["teacher_fingerprint"]["end"], loss
        assert "train/loss" in logged_columns(job), loss
    assert {"train/loss/hint", "train/loss/ce"} <= logged_columns(jobs["fitnet"])
    assert {"train/loss/tckd", "train/loss/nckd", "train/loss/ce"} <= logged_columns(jobs["dkd"])
    summary = subprocess.run(
        [sys.executable, "-m", "kd.summary", str(sweep)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert all(f"loss={loss} " in summary for loss in LOSSES)
