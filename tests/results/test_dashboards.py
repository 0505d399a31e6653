"""Dashboards: wandb offline runs (one per job), TensorBoard and CSV side by side, and wandb's mode."""

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, run_cli


def wandb_records(path: Path) -> Iterator:
    """The records of a .wandb file: a ':W&B' header, then LevelDB-log chunks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_run(job_dir: Path) -> dict:
    [run_dir] = list((job_dir / "wandb").glob("offline-run-*"))  # exactly one run per job
    [log_file] = list(run_dir.glob("run-*.wandb"))
    run, config, history = None, {}, []
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({item_key(item): json.loads(item.value_json) for item in record.history.item})
    return {"dir": run_dir, "run": run, "config": config, "history": history}


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with wandb's own config, cache and data folders inside the test's folder."""
    folders = {name: str(tmp_path / "wandb-home" / name) for name in ("config", "cache", "data")}
    return {
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": folders["config"],
        "WANDB_CACHE_DIR": folders["cache"],
        "WANDB_DATA_DIR": folders["data"],
    }


@pytest.mark.slow
def test_wandb_offline_sweep_gives_each_job_its_own_run_beside_tensorboard_and_csv(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "logger=[csv,wandb,tensorboard]", "seed=0,1", "loss.alpha=0.5", *FAST, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, cache_dir=cache_dir, extra_env=wandb_env(tmp_path), timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [offline_run(sweep / job) for job in ("0", "1")]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    for job, run in zip(("0", "1"), runs, strict=True):
        results = json.loads((sweep / job / "results.json").read_text())
        assert run["run"].run_group == f"{tmp_path.name}/sweep"  # the sweep's folder: one group for the sweep
        chosen = {"teacher:digits_teacher", "student:digits_student", "loss:kd", "data:digits"}
        real = {"teacher_model:digits_teacher", "student_model:digits_student"}  # the models built (kd.weights.names)
        assert set(run["run"].tags) == chosen | real
        assert run["config"]["optim"]["lr"] == 0.1 and run["config"]["loss"]["alpha"] == 0.5  # resolved config
        assert run["config"]["seed"] == int(job)
        logged = {key for row in run["history"] for key in row}
        assert {"train/loss", "train/loss/kd", "train/loss/ce", "lr-SGD", "student/top1", "agreement"} <= logged
        steps = [row["trainer/global_step"] for row in run["history"] if "lr-SGD" in row]
        assert len(steps) == len(set(steps)) == results["history"][-1]["step"]  # the LR at every training step
        final = [row["student/top1"] for row in run["history"] if "student/top1" in row][-1]
        assert final == results["metrics"]["student/top1"]
        assert list((run["dir"] / "files" / "media" / "table").glob("results_*.table.json"))  # the results table
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
        assert (sweep / job / "csv" / "metrics.csv").is_file()
    summary_run = list((sweep / "wandb").glob("offline-run-*/files/media/table/summary_*.table.json"))
    assert len(summary_run) == 1 and len(json.loads(summary_run[0].read_text())["data"]) == 2
    assert "wandb sync" in result.stdout + result.stderr


def wandb_mode_in(env: dict[str, str], tmp_path: Path) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean.update(HOME=str(tmp_path), NETRC=str(tmp_path / ".netrc"), **env)
    code = "from kd.results.dashboards import wandb_mode; print(wandb_mode(None))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_wandb_is_offline_without_an_api_key_and_online_with_one(tmp_path):
    assert wandb_mode_in({}, tmp_path) == "offline"
    assert wandb_mode_in({"WANDB_API_KEY": "0123456789" * 4}, tmp_path) == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert wandb_mode_in({"WANDB_BASE_URL": "https://api.wandb.ai"}, tmp_path) == "online"  # `wandb login`
    assert wandb_mode_in({"WANDB_MODE": "disabled"}, tmp_path) == "None"  # the user's WANDB_MODE decides


def test_a_refused_run_starts_no_wandb_run(tmp_path, cache_dir):
    env = wandb_env(tmp_path)
    result = run_cli("trainer.max_epochs=2", "sched.warmup_epochs=3", cwd=tmp_path, cache_dir=cache_dir, extra_env=env)
    assert result.returncode == 2 and "covers the whole run" in result.stderr
    assert not list(tmp_path.glob("wandb/*"))  # the loggers attach only after every check passed


def test_a_run_that_fails_while_training_ends_its_wandb_run_as_failed(tmp_path, cache_dir):
    env = wandb_env(tmp_path)
    diverging = [*FAST, "optim.lr=1e30", "sched.warmup_epochs=0"]  # the KD term becomes NaN at step 1
    result = run_cli(*diverging, cwd=tmp_path, cache_dir=cache_dir, extra_env=env)
    assert result.returncode == 2 and "became nan at step 1" in result.stderr
    [log_file] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    exits = [r.exit.exit_code for r in wandb_records(log_file) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]  # finished by kd as failed (wandb's own exit hook would record the process's code 2)
