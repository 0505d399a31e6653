"""Multiruns: the sweep summary, failed jobs, and the launchers."""

import csv
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from kd.summary import load_jobs, markdown_table, write_summary
from tests.conftest import FAST, ROOT, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONE_EPOCH = [o for o in FAST if not o.startswith("trainer.max_epochs=")] + [
    "trainer.max_epochs=1",
    "sched.warmup_epochs=0",
]
SWEEP_TIMEOUT = 1800  # several jobs in one process; generous, for a machine shared with other work


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_three_job_sweep_summarizes_the_jobs_results(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "loss=ce,soft_ce,kd", *FAST, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, cache_dir=cache_dir, timeout=SWEEP_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_csv(sweep / "summary.csv")
    assert [row["job"] for row in rows] == ["0", "1", "2"]
    for row in rows:
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        assert row["status"] == "ok" and row["loss"] == results["loss"] and row["variant"] == f"loss={results['loss']}"
        for key, value in results["metrics"].items():
            assert float(row[key]) == value, key  # the very numbers, not rounded
        assert float(row["wall_time_s"]) == results["wall_time_s"]
        assert float(row["train_images_per_s"]) == results["train_images_per_s"]
        history = results["history"]  # validation before training, then after each of the 2 epochs
        assert [h["epoch"] for h in history] == [0, 1.0, 2.0]
        assert history[0]["student/top1"] == results["metrics"]["student_init/top1"]
        assert history[-1]["student/top1"] == pytest.approx(results["metrics"]["student/top1"])
        assert "epoch 2/2" in (sweep / row["job"] / "run.log").read_text()  # not a terminal: one line per epoch

    markdown = (sweep / "summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| loss=")]
    assert len(table) == 3 and "| loss=ce | 1 |" in markdown and "baseline" in markdown
    top1 = {row["loss"]: float(row["student/top1"]) for row in rows}
    best = max(top1, key=top1.get)
    assert table[0].startswith(f"| loss={best} |")  # best first
    kd_row = next(line for line in table if line.startswith("| loss=kd |"))
    assert f"{100 * (top1['kd'] - top1['ce']):+.2f}" in kd_row  # difference to the ce baseline, in points
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC and (sweep / "summary.png").stat().st_size > 5000
    assert "| variant | seeds | student top-1 %" in result.stdout  # printed at the end

    # Rebuilt later from the same folder: the same table; a job without results.json counts as unfinished.
    csv_before = (sweep / "summary.csv").read_text()
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep / name).unlink()
    rebuild = subprocess.run(
        [sys.executable, "-m", "kd.summary", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert rebuild.returncode == 0, rebuild.stderr
    assert (sweep / "summary.csv").read_text() == csv_before and (sweep / "summary.png").is_file()
    assert table[0] in rebuild.stdout
    (sweep / "2" / "results.json").unlink()
    summary = write_summary(sweep)
    assert [job.status for job in summary.jobs] == ["ok", "ok", "unfinished"]
    assert "job 2 (`loss=kd " in summary.markdown and "unfinished" in summary.markdown


@pytest.mark.slow
def test_a_failing_job_is_listed_and_the_sweep_completes(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "loss=ce", "optim.lr=0.1,-1", *ONE_EPOCH, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, cache_dir=cache_dir, timeout=SWEEP_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]  # some job failed: the sweep says so in its exit code
    assert (sweep / "0" / "results.json").is_file()
    assert not (sweep / "1" / "results.json").exists()  # nothing that looks like a success
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert failure["status"] == "failed" and failure["error"] == "optim.lr=-1 must be positive"
    assert "optim.lr=-1" in failure["overrides"]
    rows = read_csv(sweep / "summary.csv")
    assert [(row["status"], row["error"]) for row in rows] == [("ok", ""), ("failed", "optim.lr=-1 must be positive")]
    markdown = (sweep / "summary.md").read_text()
    assert "| optim.lr=0.1 | 1 |" in markdown
    assert "- job 1 (`loss=ce optim.lr=-1" in markdown and "failed: optim.lr=-1 must be positive" in markdown
    assert "Traceback" not in result.stdout + result.stderr  # a user error is one sentence, not a trace
    assert (sweep / "summary.png").is_file()


def explode(cfg):
    raise RuntimeError("a bug in a task")


def test_a_crashing_job_records_its_exception_and_returns(make_cfg, tmp_path, caplog):
    from kd.launch.run import run_task

    cfg = make_cfg("hydra.mode=MULTIRUN", "seed=3")
    cfg.task = {"_target_": "tests.results.test_sweep.explode", "_partial_": True}
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    (out / "failure.json").write_text("{}")  # from an earlier attempt: replaced
    HydraConfig.instance().set_config(cfg)
    try:
        with caplog.at_level(logging.ERROR, logger="kd"):
            assert run_task(cfg) is None
    finally:
        HydraConfig.instance().cfg = None
    failure = json.loads((out / "failure.json").read_text())
    assert failure["error"] == "RuntimeError: a bug in a task" and "seed=3" in failure["overrides"]
    assert not (out / "results.json").exists()
    assert "Traceback" in caplog.text  # a bug keeps its traceback in the job's log


def write_job(sweep: Path, name: str, overrides: list[str], top1: float | None, agreement: float = 0.9) -> None:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if top1 is not None:
        results = {"loss": "x", "metrics": {"student/top1": top1, "agreement": agreement}, "wall_time_s": 10.0}
        (folder / "results.json").write_text(json.dumps({**results, "overrides": overrides}))


def test_variants_are_ranked_with_mean_std_and_the_difference_to_ce(tmp_path):
    for i, (loss, seed, top1) in enumerate(
        [("ce", 0, 0.90), ("ce", 1, 0.92), ("kd", 0, 0.95), ("kd", 1, 0.97), ("kd", 2, None)]
    ):
        write_job(tmp_path, str(i), [f"loss={loss}", f"seed={seed}", "trainer.max_epochs=2"], top1)
    markdown = markdown_table(load_jobs(tmp_path))
    lines = markdown.splitlines()
    assert lines[0] == "| variant | seeds | student top-1 % | Δ top-1 vs ce (points) | agreement % | time s |"
    assert lines[2] == "| loss=kd | 2 of 3 | 96.00 ± 1.41 | +5.00 | 90.00 ± 0.00 | 10.0 |"
    assert lines[3] == "| loss=ce | 2 | 91.00 ± 1.41 | baseline | 90.00 ± 0.00 | 10.0 |"
    assert "Overrides shared by every job: `trainer.max_epochs=2`." in markdown
    assert "- job 4 (`loss=kd seed=2 trainer.max_epochs=2`): unfinished" in markdown

    summary = write_summary(tmp_path)
    assert summary.markdown == markdown and len(summary.failed) == 1
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("summary.csv", "summary.md", "summary.png"):  # readable like any file the user writes
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_summary_of_a_folder_without_jobs_is_one_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kd.summary", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "nope") in result.stderr


def test_slurm_launcher_composes_from_the_trainer_settings(make_cfg):
    cfg = make_cfg("hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.timeout_min=90")
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes, launcher.timeout_min) == (4, 4, 2, 90)
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    assert isinstance(instantiate(launcher), SlurmLauncher)


def test_joblib_launcher_composes(make_cfg):
    cfg = make_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    assert cfg.hydra.launcher.n_jobs == 2 and isinstance(instantiate(cfg.hydra.launcher), JoblibLauncher)


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_and_trains_shared_weights_once(tmp_path):
    cache, sweep = tmp_path / "fresh-cache", tmp_path / "sweep"  # empty: both jobs need the weights=auto models
    result = run_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *ONE_EPOCH, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, cache_dir=cache, timeout=SWEEP_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["status"] for row in read_csv(sweep / "summary.csv")] == ["ok", "ok"]
    logs = [(sweep / job / "run.log").read_text() for job in ("0", "1")]
    trained = [log for log in logs if "teacher digits_teacher: no weights given, so trained it" in log]
    assert len(trained) == 1  # the other job waited for the file lock and reused the weights
    assert len(list((cache / "pretrained").glob("digits_teacher-*.safetensors"))) == 1


def test_a_sweep_where_every_job_failed_says_so_and_draws_nothing(tmp_path):
    write_job(tmp_path, "0", ["optim.lr=-1"], top1=None)
    (tmp_path / "0" / "failure.json").write_text(json.dumps({"error": "optim.lr=-1 must be positive"}))
    (tmp_path / "summary.png").write_bytes(PNG_MAGIC)  # from an earlier summary of this folder
    summary = write_summary(tmp_path)
    assert summary.markdown.startswith("No job finished.")
    assert "- job 0 (`optim.lr=-1`): failed: optim.lr=-1 must be positive" in summary.markdown
    assert not (tmp_path / "summary.png").exists()
