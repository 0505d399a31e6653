"""sched=multistep: the LR logged at every step of a real run follows the formula (warmup, then a drop at
each milestone epoch), per step and per epoch; bad milestones or gammas stop before any work; a killed
run resumes to the same weights."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import tests.training.test_resume as resume_machinery
from kd.errors import KdError
from kd.tasks.train import fit
from kd.training.multistep import warmup_multistep
from tests.conftest import FAST, assert_only_hydra_files, run_cli

STEPS_PER_EPOCH = 5
# Labels only (no teacher), a student from scratch, 4 epochs of 5 steps, every step logged.
RUN = [
    "task=train",
    "student.weights=none",
    "logger=[csv]",
    "sched=multistep",
    "optim.lr=0.2",
    "trainer.max_epochs=4",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=1",
]


def logged_lrs(out_dir) -> dict[int, float]:
    """The LR LearningRateMonitor wrote for each optimizer step (the one that step ran with)."""
    with open(out_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["lr-SGD"]) for row in csv.DictReader(f) if row.get("lr-SGD")}


def per_step_lr(step: int, base: float, warmup_steps: int, milestones: list[int], gamma: float) -> float:
    if step < warmup_steps:
        return base * step / warmup_steps
    epoch = step // STEPS_PER_EPOCH
    return base * gamma ** len([m for m in milestones if m <= epoch])


def per_epoch_lr(step: int, base: float, warmup_epochs: int, milestones: list[int], gamma: float) -> float:
    epoch = step // STEPS_PER_EPOCH
    if epoch < warmup_epochs:
        return base * min(1.0, (epoch + 1) / warmup_epochs)
    return base * gamma ** len([m for m in milestones if m <= epoch])


def test_per_step_lr_ramps_in_the_warmup_and_drops_at_each_milestone(make_cfg, tmp_path):
    cfg = make_cfg(*RUN, "sched.warmup_epochs=1", "sched.milestones=[2,3]", "sched.gamma=0.5")
    fit(cfg, task="train")
    lrs = logged_lrs(tmp_path / "out")
    assert sorted(lrs) == list(range(4 * STEPS_PER_EPOCH))
    for step, lr in lrs.items():
        assert lr == pytest.approx(per_step_lr(step, 0.2, STEPS_PER_EPOCH, [2, 3], 0.5), abs=1e-12), step
    assert [lrs[s] for s in (0, 1, 4, 5, 9, 10, 15, 19)] == pytest.approx([0, 0.04, 0.16, 0.2, 0.2, 0.1, 0.05, 0.05])


def test_per_epoch_lr_changes_only_at_epoch_boundaries(make_cfg, tmp_path):
    cfg = make_cfg(*RUN, "sched.warmup_epochs=2", "sched.milestones=[2,3]", "sched.gamma=0.1", "sched.per_step=false")
    fit(cfg, task="train")
    lrs = logged_lrs(tmp_path / "out")
    assert sorted(lrs) == list(range(4 * STEPS_PER_EPOCH))
    for step, lr in lrs.items():
        assert lr == pytest.approx(per_epoch_lr(step, 0.2, 2, [2, 3], 0.1), abs=1e-12), step
    by_epoch = [[lrs[s] for s in range(e * STEPS_PER_EPOCH, (e + 1) * STEPS_PER_EPOCH)] for e in range(4)]
    assert all(len(set(epoch)) == 1 for epoch in by_epoch)  # constant within each epoch
    assert [epoch[0] for epoch in by_epoch] == pytest.approx([0.1, 0.2, 0.02, 0.002])


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"milestones": [3, 2]}, r"^sched\.milestones=\[3, 2\] must increase strictly, e\.g\. \[150, 180, 210\]$"),
        ({"milestones": [2, 2]}, r"must increase strictly"),
        ({"milestones": [0, 2]}, r"must be whole epochs of 1 or more"),
        ({"milestones": [1.5]}, r"must be whole epochs of 1 or more"),
        ({"milestones": [2, 4]}, r"reaches epoch 4, but the run has 4 epochs \(0 to 3\); give milestones inside"),
        ({"gamma": 0.0}, r"^sched\.gamma=0\.0 must lie in \(0, 1\]"),
        ({"gamma": -0.1}, r"^sched\.gamma=-0\.1 must lie in \(0, 1\]"),
        ({"gamma": 1.5}, r"^sched\.gamma=1\.5 must lie in \(0, 1\]"),
        ({"warmup_epochs": 3, "milestones": [2]}, r"^sched\.warmup_epochs=3 outlasts the first milestone \(epoch 2\)"),
        ({"warmup_epochs": 4, "milestones": []}, r"^sched\.warmup_epochs=4 covers the whole run \(20 steps\)"),
        ({"warmup_epochs": -1}, r"^sched\.warmup_epochs=-1 is negative"),
    ],
)
def test_bad_numbers_get_one_sentence(settings, says):
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(KdError, match=says) as raised:
        warmup_multistep(probe, total_steps=20, steps_per_epoch=5, **{"milestones": [2, 3], **settings})
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 300


def test_a_bad_milestone_stops_the_run_before_any_training(make_cfg, tmp_path):
    """Milestones the user set are refused; a recipe's default ones fit the run (tests/training/test_schedule.py)."""
    with pytest.raises(KdError, match=r"sched\.milestones=\[150, 180, 210\] reaches epoch 210, but the run has 4"):
        fit(make_cfg(*RUN, "sched.milestones=[150,180,210]"), task="train")
    assert_only_hydra_files(tmp_path / "out")


def test_the_schedule_state_round_trips():
    """Lightning checkpoints the scheduler's state_dict; a restored one gives the same LRs."""
    first = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    second = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    scheduler = warmup_multistep(first, 40, 10, milestones=[2, 3], gamma=0.1, warmup_epochs=1)
    restored = warmup_multistep(second, 40, 10, milestones=[1], gamma=0.5)
    restored.load_state_dict(scheduler.state_dict())
    for step in range(40):
        scheduler.step_update(step), restored.step_update(step)
        assert first.param_groups[0]["lr"] == second.param_groups[0]["lr"]


# The digits recipe of tests/training/test_resume.py, with the multistep schedule: 2 epochs of 22 steps, a drop at
# epoch 1 after a 0.5-epoch warmup, checkpoints every 3 steps.
RESUME_RUN = [*FAST, "callbacks.checkpoint.every_n_train_steps=3", "sched=multistep", "sched.milestones=[1]"]
RESUME_RUN += ["sched.warmup_epochs=0.5", "logger=csv"]  # the LR is read from the csv log; wandb resume: test_resume


@pytest.mark.slow
def test_a_killed_multistep_run_resumes_to_the_same_weights(tmp_path, cache_dir):
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    alone.mkdir(), killed.mkdir()
    result = run_cli(*RESUME_RUN, cwd=alone, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = resume_machinery.start_and_kill(killed, cache_dir, kill_after_step=7, run=RESUME_RUN)  # inside the warmup
    stopped_at = last["global_step"]
    assert 0 < stopped_at < 44
    resumed = run_cli(*RESUME_RUN, "ckpt_path=last", cwd=killed, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (resume_machinery.load(f / "checkpoints" / "last.ckpt") for f in (alone, killed))
    assert got["global_step"] == expected["global_step"] == 44
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), f"{key} differs after a kill at step {stopped_at}"
    assert logged_lrs(killed)[stopped_at] == logged_lrs(alone)[stopped_at]
    metrics = [json.loads((folder / "results.json").read_text())["metrics"] for folder in (alone, killed)]
    assert metrics[0] == metrics[1]
