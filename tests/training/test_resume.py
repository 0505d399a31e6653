"""A killed run resumes from its last checkpoint and ends exactly where the uninterrupted run ends."""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kd.data.digits import DigitsData
from kd.data.sampling import ResumableSampler, SeededViews, validation_sampler
from kd.launch.run import user_error
from kd.losses.base import DistillationLoss
from kd.students import fast
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data
from kd.tasks.models import build_teacher
from kd.tasks.train import fit
from kd.teachers import guards
from kd.training.resume import RestoreRng
from tests.conftest import FAST, ROOT, assert_only_hydra_files, run_cli

# 2 epochs of 22 steps (1,437 digits, batch 64), a checkpoint every 3 steps (and, by kd's Checkpoint, after the last).
RUN = [*FAST, "callbacks.checkpoint.every_n_train_steps=3"]
TOTAL_STEPS = 44


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def start_and_kill(
    folder, cache_dir, kill_after_step: int, run: list[str] = RUN, sig: signal.Signals = signal.SIGKILL
) -> dict:
    """Start the run, send it ``sig`` (SIGKILL) once a checkpoint of step >= kill_after_step exists; its last
    checkpoint once the process has ended (with -SIGKILL, or kd's 143 after a SIGTERM)."""
    env = {**os.environ, "KD_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    command = [sys.executable, str(ROOT / "run.py"), *run, f"hydra.run.dir={folder}"]
    log = (folder.parent / "killed.err").open("w")
    process = subprocess.Popen(command, cwd=folder.parent, env=env, stdout=subprocess.DEVNULL, stderr=log)
    last = folder / "checkpoints" / "last.ckpt"
    seen = None
    try:
        while process.poll() is None:
            time.sleep(0.01)
            try:
                stamp = last.stat().st_mtime_ns
                if stamp != seen and load(last)["global_step"] >= kill_after_step:
                    process.send_signal(sig)
                    break
                seen = stamp
            except (RuntimeError, OSError, EOFError):
                pass  # not written yet, or replaced while being read
        expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
        assert process.wait(timeout=600) == expected, (folder.parent / "killed.err").read_text()[-3000:]
    finally:
        process.kill()
        log.close()
    return load(last)


@pytest.mark.slow
# The default format with the default loggers (csv and offline wandb, whose run resumes too); NCHW with csv alone.
# Strong augmentation and mixup (timm's ops draw from Python's, NumPy's and torch's generators) resume exactly too,
# and so does bf16-mixed (explicit here for every machine).
@pytest.mark.parametrize(
    "memory_format",
    [
        "student.channels_last=true",
        "student.channels_last=false logger=csv",
        "logger=csv data.auto_augment=rand-m9-mstd0.5-inc1 data.re_prob=0.25 mixup=mixup",
        "trainer.precision=bf16-mixed teacher.precision=bf16 logger=csv",
    ],
)
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(tmp_path, cache_dir, memory_format):
    run = [*RUN, *memory_format.split()]  # the student's NHWC and NCHW formats both resume exactly
    # Seeded (KD_RESUME_KILL_SEED to try another step), logged, and named by every failing assert below.
    seed = int(os.environ.get("KD_RESUME_KILL_SEED", "0"))
    kill_after = random.Random(seed).choice([s for s in range(3, TOTAL_STEPS - 8) if s % 22])  # not at an epoch end
    print(f"kill step {kill_after} (KD_RESUME_KILL_SEED={seed})")
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    alone.mkdir(), killed.mkdir()
    result = run_cli(*run, cwd=alone, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    last = start_and_kill(killed, cache_dir, kill_after, run)
    stopped_at = last["global_step"]
    assert 0 < stopped_at < TOTAL_STEPS, f"killed after step {kill_after}, last checkpoint at {stopped_at}"
    assert not (killed / "results.json").exists()
    resumed = run_cli(*run, "ckpt_path=last", cwd=killed, cache_dir=cache_dir)
    assert resumed.returncode == 0, f"killed after step {kill_after}: {resumed.stderr[-3000:]}"
    assert f"(epoch {last['epoch']}, step {stopped_at})" in (killed / "run.log").read_text(), f"kill at {kill_after}"

    expected, got = load(alone / "checkpoints" / "last.ckpt"), load(killed / "checkpoints" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == TOTAL_STEPS, f"killed at step {stopped_at}"
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), f"{key} differs after a kill at step {stopped_at}"
    for group, other in zip(
        expected["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(group["momentum_buffer"], other["momentum_buffer"]), f"killed at step {stopped_at}"
    metrics = [json.loads((folder / "results.json").read_text())["metrics"] for folder in (alone, killed)]
    assert metrics[0] == metrics[1], f"killed at step {stopped_at}"


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_saves_its_step_and_resumes_to_the_same_weights(tmp_path, cache_dir):
    """SIGTERM (preemption): the step ends, last.ckpt holds it, one line says how to resume, exit code 143."""
    run = [*FAST, "logger=csv", "callbacks.checkpoint.every_n_train_steps=10"]
    alone, stopped = tmp_path / "alone", tmp_path / "stopped"
    alone.mkdir(), stopped.mkdir()
    result = run_cli(*run, cwd=alone, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    last = start_and_kill(stopped, cache_dir, kill_after_step=10, run=run, sig=signal.SIGTERM)
    stopped_at = last["global_step"]  # the step the signal arrived in (the fast test below pins it exactly)
    assert 10 <= stopped_at < TOTAL_STEPS
    said = (stopped / "run.log").read_text()
    line = f"stopped by SIGTERM after step {stopped_at} (epoch {last['epoch']}); its state is in {stopped}/checkpoints/"
    assert line in said and f"resume with: python run.py {' '.join(run)} hydra.run.dir={stopped}" in said
    assert "Traceback" not in said + (tmp_path / "killed.err").read_text() and not (stopped / "results.json").exists()
    assert not list(stopped.rglob("*.tmp"))

    resumed = run_cli(*run, "ckpt_path=last", cwd=stopped, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = load(alone / "checkpoints" / "last.ckpt"), load(stopped / "checkpoints" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == TOTAL_STEPS
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), f"{key} differs after a SIGTERM at step {stopped_at}"
    metrics = [json.loads((folder / "results.json").read_text())["metrics"] for folder in (alone, stopped)]
    assert metrics[0] == metrics[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A short distillation run (1 epoch, checkpoint at its end): its folder, overrides and model files."""
    from hydra import compose, initialize_config_dir

    from kd.launch.configs import CONF_DIR

    folder = tmp_path_factory.mktemp("finished")
    overrides = [*FAST, "trainer.max_epochs=1", "sched.warmup_epochs=0", f"paths.cache_dir={cache_dir}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={folder}", *overrides], return_hydra_config=True)
    fit(cfg, task="distill")
    cache = AutoWeights(cache_dir, cfg.data, build_data(cfg, cfg.student), "cpu")
    models = [f"{role}.weights={cache.path_for(cfg[role])}" for role in ("teacher", "student")]
    return folder, overrides, models


def refusal(make_cfg, *overrides) -> str:
    """The refusal's sentence; the run wrote nothing (no csv/hparams.yaml of a logger attached too early)."""
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    problem = user_error(raised.value)
    assert problem is not None, raised.value
    assert_only_hydra_files(Path(cfg.paths.output_dir))
    return str(problem)


def test_resuming_with_another_teacher_is_refused(make_cfg, finished_run, tmp_path):
    folder, overrides, models = finished_run
    cfg = make_cfg(*overrides, *models)
    teacher = build_teacher(cfg, 10, None)
    state = {k: v.contiguous().clone() for k, v in teacher.model.net.state_dict().items()}  # channels-last teacher
    state["fc.bias"] += 0.01  # a slightly different teacher
    other = tmp_path / "other-teacher.safetensors"
    save_file(state, str(other))
    message = refusal(make_cfg, *overrides, f"teacher.weights={other}", f"ckpt_path={folder}/checkpoints/last.ckpt")
    assert message.startswith(f"checkpoint {folder}/checkpoints/last.ckpt was distilled from another teacher")
    assert message.endswith("resume with the teacher and teacher.weights the run started with")


def test_resuming_with_another_batch_size_or_student_is_refused(make_cfg, finished_run):
    folder, overrides, models = finished_run
    checkpoint = f"ckpt_path={folder}/checkpoints/last.ckpt"
    message = refusal(make_cfg, *overrides, *models, "data.batch_size=32", checkpoint)
    assert "was written with data.batch_size=64, this run has 32; resume with the same setting" in message
    message = refusal(make_cfg, *overrides, "student.arch.net.width=16", "student.weights=none", checkpoint)
    assert "holds another student or loss" in message


def test_a_truncated_checkpoint_is_refused(make_cfg, finished_run, tmp_path):
    folder, overrides, _ = finished_run
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((folder / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    message = refusal(make_cfg, *overrides, f"ckpt_path={broken}")
    assert message.startswith(f"checkpoint {broken} cannot be read (")


def test_resuming_a_finished_run_trains_no_further(make_cfg, finished_run):
    folder, overrides, _ = finished_run
    results = fit(make_cfg(*overrides, f"ckpt_path={folder}/checkpoints/last.ckpt"), task="distill")
    finished = json.loads((folder / "results.json").read_text())["metrics"]
    assert results["metrics"]["student/top1"] == finished["student/top1"]


def test_a_resumed_run_makes_each_check_once(make_cfg, finished_run, monkeypatch):
    """The task checks before any work; the module and its callbacks do not check the same thing again."""
    calls = collections.Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name, id(args[0]) if name == "bind_data" else None] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fast, "check_compile", counted("check_compile", fast.check_compile))
    monkeypatch.setattr(fast, "channels_last_setting", counted("channels_last", fast.channels_last_setting))
    monkeypatch.setattr(guards, "check_teacher", counted("check_teacher", guards.check_teacher))
    monkeypatch.setattr(DistillationLoss, "bind_data", counted("bind_data", DistillationLoss.bind_data))
    folder, overrides, _ = finished_run
    fit(make_cfg(*overrides, f"ckpt_path={folder}/checkpoints/last.ckpt"), task="distill")
    assert {name for name, _ in calls} == {"check_compile", "channels_last", "check_teacher", "bind_data"}
    assert set(calls.values()) == {1}, calls  # bind_data: once for each loss (the run's kd loss)


# ---------------------------------------------------------------- the pieces that make resuming exact


def test_a_resumed_sampler_continues_the_epoch_where_it_stopped():
    dataset = list(range(100))
    full = list(ResumableSampler(dataset, seed=3, start_epoch=0))
    assert sorted(index for index, _ in full) == dataset and full != sorted(full)
    resumed = ResumableSampler(dataset, seed=3, start_epoch=0, skip=40)
    assert list(resumed) == full[40:]
    resumed.set_epoch(1)
    fresh = ResumableSampler(dataset, seed=3)
    fresh.set_epoch(1)
    assert list(resumed) == list(fresh) and [e for _, e in fresh] == [1] * 100
    assert list(fresh) != [(i, 1) for i, _ in full]  # another epoch, another order


def test_ranks_split_an_epoch_and_the_validation_set_without_repeats():
    dataset = list(range(101))
    shards = [list(ResumableSampler(dataset, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51  # training pads by one sample, as DistributedSampler does
    validation = [list(validation_sampler(dataset, 2, r)) for r in (0, 1)]
    assert sorted(validation[0] + validation[1]) == dataset  # every sample exactly once
    assert validation_sampler(dataset, 1, 0) is None


def test_training_views_depend_on_seed_epoch_and_index_only():
    data = DigitsData(max_shift=1)
    data.setup()
    views = SeededViews(data.train_set, seed=0)
    first = views[(5, 0)][0]
    torch.manual_seed(1234)  # whatever the global RNG did before
    views[(7, 0)]
    assert torch.equal(views[(5, 0)][0], first)
    assert not all(torch.equal(views[(5, epoch)][0], first) for epoch in range(1, 6))  # a new shift per epoch
    state = torch.get_rng_state()
    views[(5, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


def test_rng_states_travel_through_a_checkpoint_and_return_before_the_first_resumed_step(tmp_path):
    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    saving = RestoreRng()
    torch.save(saving.state_dict(), tmp_path / "rng.pt")  # as Lightning stores a callback's state
    expected = draws()

    resuming = RestoreRng()
    resuming.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    draws()  # setting up draws from the RNGs before training starts
    resuming.on_train_start(trainer=None, pl_module=None)
    assert draws() == expected


def test_sigterm_stops_after_the_step_it_arrives_in_and_writes_that_step_to_last_ckpt(tmp_path):
    """A real SIGTERM to this process in step 3 of a Lightning fit with kd's Checkpoint (fast; the whole
    ``python run.py`` path is the slow test above)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from kd.training.resume import AtomicCheckpointIO, Checkpoint

    class SigtermInStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # the 3rd step begins: the signal arrives while it runs
                os.kill(os.getpid(), signal.SIGTERM)

    folder = tmp_path / "checkpoints"
    checkpoint = Checkpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=10)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        logger=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoint, SigtermInStep3()],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert signal.getsignal(signal.SIGTERM) == previous  # Lightning put the process's own handler back
    assert load(folder / "last.ckpt")["global_step"] == 3  # the step the signal arrived in, whole
    assert not list(folder.glob("*.tmp"))
