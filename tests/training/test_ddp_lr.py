"""Runs through run.py: the LR logged in csv/metrics.csv at every step, and 2 gloo processes against one.

The reference run (1 process, batch 64) and the DDP run (2 processes, batch 32 each: the same global batch of 64)
are each run once per module; the LR tests read their metrics.csv and the equivalence test their students.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli

BASE_LR, MIN_LR, EPOCHS, WARMUP_EPOCHS = 0.1, 0.01, 2, 1
TRAIN_IMAGES = 1437  # conf/data/digits.yaml: the fixed split's training images
# Random models (weights=none): the schedule and the distributed arithmetic do not need pretrained ones.
SETUP = [
    "teacher.weights=none",
    "student.weights=none",
    "logger=csv",
    "student.measure_speed=false",
    f"optim.lr={BASE_LR}",
    f"sched.min_lr={MIN_LR}",
    f"sched.warmup_epochs={WARMUP_EPOCHS}",
    f"trainer.max_epochs={EPOCHS}",
    # float32: one process and two must agree to 1e-5, which bf16-mixed's rounding (batches of 64 vs 2 x 32) does not
    "trainer.precision=32-true",
]


def expected_lr(step: int, warmup: int, total: int) -> float:
    """Written here from the schedule's definition, not from kd's code: a linear ramp from 0 to the base LR over
    the first ``warmup`` updates, then a half cosine from the base LR down to the minimum over the rest."""
    if step < warmup:
        return BASE_LR * step / warmup
    progress = (step - warmup) / (total - warmup)
    return MIN_LR + (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


def updates_per_epoch(processes: int, batch_size: int, accumulate: int = 1) -> int:
    """Each process gets ceil(N / processes) samples (padded), cut into full batches (the short last one is dropped);
    an update every ``accumulate`` batches, the last one possibly on fewer."""
    batches = math.ceil(TRAIN_IMAGES / processes) // batch_size
    return math.ceil(batches / accumulate)


def logged_lrs(run: Path) -> dict[int, list[float]]:
    """Every ``lr-SGD`` value of metrics.csv, by the step it was logged at."""
    values: dict[int, list[float]] = defaultdict(list)
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["lr-SGD"]:
                values[int(row["step"])].append(float(row["lr-SGD"]))
    return values


def check_schedule(run: Path, per_epoch: int) -> None:
    total, warmup = EPOCHS * per_epoch, WARMUP_EPOCHS * per_epoch
    lrs = logged_lrs(run)
    assert sorted(lrs) == list(range(total)), f"LR logged at steps {sorted(lrs)}, expected 0..{total - 1}"
    for step, values in lrs.items():
        want = expected_lr(step, warmup, total)
        assert values == pytest.approx([want] * len(values), rel=1e-6, abs=1e-9), f"step {step} (warmup {warmup})"
    # The ends of the warmup, exactly. (With accumulation the monitor logs once per batch: each update's LR twice.)
    assert set(lrs[0]) == {0.0} and lrs[warmup][0] == pytest.approx(BASE_LR)


def run_ok(tmp_path_factory, cache_dir: Path, name: str, *args: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    result = run_cli(*SETUP, *args, cwd=folder, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


# The digits ConvNet's BatchNorm would normalize each process's 32 images by their own statistics, and
# trainer.sync_batchnorm cannot help on CPU (torch's SyncBatchNorm is GPU-only): a student without BatchNorm.
# (The teacher's BatchNorm is in eval mode, on running statistics: the same in every process.)
NORM_FREE = "student.arch.net._target_=tests.tiny_models.NormFreeConvNet"


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir) -> Path:
    return run_ok(tmp_path_factory, cache_dir, "single", NORM_FREE, "data.batch_size=64")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, cache_dir) -> Path:
    return run_ok(tmp_path_factory, cache_dir, "ddp", NORM_FREE, "trainer=ddp_cpu", "data.batch_size=32")


@pytest.mark.slow
def test_logged_lr_is_warmup_cosine_at_every_step(single):
    check_schedule(single, updates_per_epoch(1, 64))


@pytest.mark.slow
def test_logged_lr_counts_updates_not_batches_when_accumulating(tmp_path_factory, cache_dir):
    run = run_ok(tmp_path_factory, cache_dir, "accumulate", "data.batch_size=64", "trainer.accumulate_grad_batches=2")
    assert updates_per_epoch(1, 64, 2) == 11  # 22 batches per epoch, so the warmup is 11 updates, not 22 batches
    check_schedule(run, updates_per_epoch(1, 64, 2))


@pytest.mark.slow
def test_logged_lr_on_two_processes(ddp):
    check_schedule(ddp, updates_per_epoch(2, 32))


@pytest.mark.slow
def test_two_processes_train_the_same_student_as_one_with_the_same_global_batch(single, ddp):
    """DistributedSampler deals the epoch's permutation out round-robin (rank r gets positions r, r+2, ...), so
    the two batches of 32 of global step k are together positions 64k..64k+63 of the same permutation: the
    single process's batch k. DDP averages the two gradients, each a mean over 32 images, into the mean over 64."""
    alone, shared = (json.loads((run / "results.json").read_text()) for run in (single, ddp))
    assert alone["world_size"] == 1 and shared["world_size"] == 2
    assert alone["metrics"]["student/top1"] != alone["metrics"]["student_init/top1"]  # training moved the student
    one, two = (load_file(run / "student.safetensors") for run in (single, ddp))
    assert one.keys() == two.keys() and one
    worst = {name: float((one[name].double() - two[name].double()).abs().max()) for name in one}
    scale = max(float(one[name].double().abs().max()) for name in one)
    assert max(worst.values()) <= 1e-5 * max(1.0, scale), sorted(worst.items(), key=lambda item: -item[1])[:3]
    for key in ("student/top1", "student/top5"):
        assert shared["metrics"][key] == pytest.approx(alone["metrics"][key], abs=1e-6), key
