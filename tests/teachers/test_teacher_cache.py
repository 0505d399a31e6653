"""The teacher-output cache: exact reconstruction, same losses as the real teacher, never a stale or
half-written cache."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from kd.data.sampling import SeededViews
from kd.errors import KdError
from kd.module import DistillationModule
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.cache_teacher import cache_teacher
from kd.tasks.common import build_data, planned_trainer
from kd.tasks.models import build_teacher, cache_settings
from kd.tasks.train import fit
from kd.teachers import FrozenTeacher
from kd.teachers.cache import decode, encode, resolve_topk
from kd.teachers.fill import epochs_to_cover, open_teacher_cache
from tests.conftest import FAST, ROOT, run_cli

# Short runs: 2 epochs of 4 steps, enough to see every step's loss move.
SHORT = [*FAST, "trainer.limit_train_batches=4"]


def test_topk_reconstruction_keeps_the_stored_softmax_mass_and_spreads_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 4
    decoded = decode(encode(logits, 5), 50)
    probs, rebuilt = torch.softmax(logits, 1), torch.softmax(decoded, 1)
    top = logits.topk(5, dim=1).indices
    # Stored classes keep their probability (up to float16 rounding of the logit relative to the row's max).
    assert torch.allclose(rebuilt.gather(1, top), probs.gather(1, top), rtol=1e-2)
    stored = torch.exp(decoded.gather(1, top) - torch.logsumexp(logits, 1, keepdim=True))
    assert torch.allclose(rebuilt.gather(1, top), stored, rtol=1e-5)  # exact for the stored values
    rest = rebuilt.scatter(1, top, 0.0)
    expected = (1 - stored.sum(1, keepdim=True)) / 45
    assert torch.allclose(rest.sum(1), 1 - stored.sum(1), atol=1e-6)
    assert torch.allclose(rest[rest > 0].view(6, 45), expected.expand(6, 45), rtol=1e-4)  # evenly spread


def test_all_classes_round_trip_to_float16_of_the_logit_minus_the_row_max():
    torch.manual_seed(1)
    logits = torch.randn(8, 10) * 10
    decoded = decode(encode(logits, 10), 10)
    top = logits.max(1, keepdim=True).values
    assert torch.equal(decoded, top + (logits - top).half().float())
    assert ((decoded - logits).abs() <= (logits - top).abs() * 2**-11 + 1e-6).all()
    assert torch.equal(decoded.argmax(1), logits.argmax(1))


def test_topk_setting():
    assert resolve_topk("auto", 10) == 10 and resolve_topk("auto", 1000) == 10 and resolve_topk(50, 10) == 10
    with pytest.raises(KdError, match="cache_topk=0"):
        resolve_topk(0, 10)


def step_losses(out_dir) -> list[float]:
    with open(out_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture
def teacher_calls_in_training_steps(monkeypatch):
    """Counts real teacher forward passes made inside ``training_step``."""
    calls, inside = [], []
    forward, step = FrozenTeacher.forward_with_features, DistillationModule.training_step

    def counting_forward(self, images, stages=()):
        if inside:
            calls.append(images.shape[0])
        return forward(self, images, stages)

    def marked_step(self, batch, batch_idx):
        inside.append(True)
        try:
            return step(self, batch, batch_idx)
        finally:
            inside.pop()

    monkeypatch.setattr(FrozenTeacher, "forward_with_features", counting_forward)
    monkeypatch.setattr(DistillationModule, "training_step", marked_step)
    return calls


@pytest.mark.slow
def test_cached_run_gives_the_uncached_losses_at_every_step(
    make_cfg, tmp_path, teacher_calls_in_training_steps, monkeypatch
):
    cache = tmp_path / "teacher-outputs"
    plain = fit(make_cfg(*SHORT, f"paths.output_dir={tmp_path / 'plain'}"), task="distill")
    assert len(teacher_calls_in_training_steps) == 8  # the uncached run runs the teacher at every step
    teacher_calls_in_training_steps.clear()
    cached = fit(make_cfg(*SHORT, f"paths.output_dir={tmp_path / 'cached'}", f"teacher.cache={cache}"), task="distill")
    assert teacher_calls_in_training_steps == []  # the cached training step never runs the teacher

    exact, stored = np.array(step_losses(tmp_path / "plain")), np.array(step_losses(tmp_path / "cached"))
    assert len(exact) == len(stored) == 8 and len(set(exact)) == 8
    # Tolerance: the stored logits are float16 relative to each row's max (rounding error at most 2^-11
    # of |logit - max|); measured here, that moves the loss by at most 3.5e-5 of its value at any step.
    assert np.allclose(stored, exact, rtol=2e-4, atol=0), (stored, exact)
    assert cached["metrics"]["teacher/top1"] == plain["metrics"]["teacher/top1"]  # validation: the real teacher
    assert cached["teacher_fingerprint"] == plain["teacher_fingerprint"]

    # Sharper: an uncached run whose teacher logits go through the float16 storage gives the cached
    # losses (bit-equal on this CPU; the 1e-6 leaves room for kernels whose sums depend on the batch
    # composition: the cache is filled in index order, training batches are shuffled).
    forward = FrozenTeacher.forward_with_features

    def stored_precision(self, images, stages=()):
        logits, features = forward(self, images, stages)
        return decode(encode(logits, logits.shape[1]), logits.shape[1]), features

    monkeypatch.setattr(FrozenTeacher, "forward_with_features", stored_precision)
    fit(make_cfg(*SHORT, f"paths.output_dir={tmp_path / 'rounded'}"), task="distill")
    rounded = np.array(step_losses(tmp_path / "rounded"))
    assert np.allclose(stored, rounded, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_with_mixup_a_cached_run_gives_the_uncached_losses_at_every_step(
    make_cfg, tmp_path, teacher_calls_in_training_steps
):
    # mixup_cutmix: per batch either mixup or cutmix (timm's), so both kinds of mixed batch are covered.
    mixed = [*SHORT, "mixup=mixup_cutmix"]
    fit(make_cfg(*mixed, f"paths.output_dir={tmp_path / 'plain'}"), task="distill")
    assert len(teacher_calls_in_training_steps) == 8
    teacher_calls_in_training_steps.clear()
    cache = f"teacher.cache={tmp_path / 'teacher-outputs'}"
    fit(make_cfg(*mixed, f"paths.output_dir={tmp_path / 'cached'}", cache), task="distill")
    assert teacher_calls_in_training_steps == []

    exact, stored = np.array(step_losses(tmp_path / "plain")), np.array(step_losses(tmp_path / "cached"))
    assert len(exact) == len(stored) == 8 and len(set(exact)) == 8
    # The same tolerance as without mixup: the cache holds the teacher's logits on the very mixed images the
    # student trained on, up to float16 rounding (measured: at most 4.2e-5 of the loss here).
    assert np.allclose(stored, exact, rtol=2e-4, atol=0), (stored, exact)
    unmixed = np.array(step_losses_of(make_cfg, tmp_path / "unmixed", *SHORT, cache))
    assert not np.allclose(unmixed, exact, rtol=1e-2)  # mixup does change every loss: the check above has teeth


def step_losses_of(make_cfg, folder, *overrides) -> list[float]:
    fit(make_cfg(*overrides, f"paths.output_dir={folder}"), task="distill")
    return step_losses(folder)


def test_with_mixup_the_batch_size_and_process_count_are_part_of_the_cache_identity(make_cfg, tmp_path):
    base = [*FAST, f"teacher.cache={tmp_path}", "mixup=mixup"]
    store, written = open_cache(make_cfg(*base))
    assert written == [0] and store.identity["mixup"]["batch_size"] == 64
    others = [
        open_cache(make_cfg(*base, "data.batch_size=32"))[0],
        open_cache(make_cfg(*base), world_size=2)[0],  # other processes: other batches, other partners
        open_cache(make_cfg(*base, "mixup.mixup_alpha=0.4"))[0],
        open_cache(make_cfg(*FAST, f"teacher.cache={tmp_path}"))[0],  # no mixup
    ]
    assert len({store.folder, *(other.folder for other in others)}) == 5
    assert others[-1].identity["mixup"] is None  # without mixup a view does not depend on its batch:
    assert "batch_size" not in others[-1].identity["data"]["config"]  # a sweep over batch sizes shares the cache
    # Images a training batch never holds (the short last batch is dropped) are never looked up, and are not stored.
    records = np.load(store.epoch_path(0))
    assert np.isnan(records["max"]).sum() == len(records) % 64


def test_a_feature_loss_with_a_teacher_cache_is_refused_before_any_work(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "loss=fitnet", f"teacher.cache={tmp_path}", f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(KdError) as refused:
        fit(cfg, task="distill")
    assert str(refused.value) == (
        f"loss FitNet compares the teacher's feature maps, but teacher.cache={tmp_path} stores the teacher's "
        "logits only; use teacher.cache=null with feature losses"
    )
    assert not list(tmp_path.glob("digits*"))  # no cache was filled


def open_cache(cfg, epochs=1, change=None, world_size=1):
    data = build_data(cfg, cfg.student)
    teacher = build_teacher(cfg, data.num_classes, AutoWeights(cfg.paths.cache_dir, cfg.data, data, "cpu"))
    if change == "teacher":  # the same architecture and weights source, one weight moved by 1e-3
        with torch.no_grad():
            next(teacher.model.parameters())[0].add_(1e-3)
        teacher = FrozenTeacher(teacher.model)
    if change == "transform":  # the same data config, another augmentation
        data.train_set.max_shift = 2
    mixup = instantiate(cfg.mixup) if cfg.get("mixup") else None
    return open_teacher_cache(cache_settings(cfg), teacher, data, epochs, mixup, world_size)


def test_a_sweep_over_losses_and_students_shares_one_cache(make_cfg, tmp_path):
    base = [*FAST, f"teacher.cache={tmp_path}"]
    store, written = open_cache(make_cfg(*base, "loss=kd"))
    assert written == [0]
    variants = (
        "loss=soft_ce",
        "loss=ce",
        "optim=adamw",
        "student.pretrain.epochs=3",
        "+data.eval_batch_size=16",
    )
    for variant in variants:
        again, written = open_cache(make_cfg(*base, variant))
        assert (again.folder, written) == (store.folder, []), variant


def test_a_lookup_at_a_later_epoch_is_the_teachers_live_output_for_that_epochs_view(make_cfg, tmp_path):
    """Epoch 1 (and a batch mixing epochs 1 and 0) against the teacher run now on the same seeded views."""
    cfg = make_cfg(*FAST, f"teacher.cache={tmp_path}")
    data = build_data(cfg, cfg.student)
    teacher = build_teacher(cfg, data.num_classes, AutoWeights(cfg.paths.cache_dir, cfg.data, data, "cpu"))
    store, _ = open_teacher_cache(cache_settings(cfg), teacher, data, epochs=2)
    views = SeededViews(data.train_set, int(cfg.seed))
    samples = [0, 7, 301, 1436]
    keys = [(i, 1) for i in samples] + [(5, 1), (9, 0)]  # the last two: a batch of two epochs
    with torch.no_grad():
        live = teacher(torch.stack([views[key][0] for key in keys]))
    cached = store.lookup(torch.tensor(keys))
    top = live.max(1, keepdim=True).values  # stored: float16 of the logit minus its row's largest
    close = (cached - live).abs() <= (live - top).abs() * 2**-11 + 1e-4
    assert bool(close.all()), f"views {[keys[row] for row in (~close).any(1).nonzero()[:, 0].tolist()]} differ"
    epoch_0 = store.lookup(torch.tensor([(i, 0) for i in samples]))
    live = live[: len(samples)]
    assert not torch.allclose(epoch_0, live, atol=1e-2)  # another epoch's views give other outputs


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-outputs")


@pytest.mark.parametrize(
    "change", ["teacher", "transform", "seed=1", "teacher.cache_topk=3", "trainer.precision=32-true"]
)
def test_a_changed_teacher_transform_seed_k_or_precision_invalidates_the_cache(make_cfg, shared_root, change):
    base = [*FAST, f"teacher.cache={shared_root}"]  # the unchanged setup is written once for all cases
    store, _ = open_cache(make_cfg(*base))
    in_process = change in ("teacher", "transform")
    changed, written = open_cache(make_cfg(*base, *([] if in_process else [change])), change=change)
    assert written == [0] and changed.folder != store.folder
    manifest = json.loads((changed.folder / "manifest.json").read_text())
    assert manifest["identity"] == changed.identity != store.identity
    assert manifest["epochs"] == [0]


def test_a_manifest_for_another_setup_in_the_folder_is_rebuilt_not_used(make_cfg, tmp_path, caplog):
    cfg = make_cfg(*FAST, f"teacher.cache={tmp_path}")
    store, _ = open_cache(cfg)
    manifest_path = store.folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["identity"]["seed"] = 99  # as if another run had written this folder
    manifest_path.write_text(json.dumps(manifest))
    again, written = open_cache(cfg)
    assert written == [0] and "written for another setup (['seed'] differ)" in caplog.text
    assert json.loads(manifest_path.read_text())["identity"]["seed"] == 0


KILL_WHILE_WRITING = textwrap.dedent(
    """
    import os, signal, sys
    from hydra import compose, initialize_config_dir
    from kd.launch.configs import CONF_DIR, register_models
    from kd.tasks.cache_teacher import cache_teacher
    from kd.teachers.cache import TeacherOutputStore

    register_models()
    write_epoch = TeacherOutputStore._write_epoch

    def killed_half_way_through_epoch_1(self, tmp, epoch, fill, every_sample):
        def fill_then_die(e, write):
            batches = []
            def counting_write(indices, logits):
                write(indices, logits)
                batches.append(1)
                if e == 1 and len(batches) == 10:
                    os.kill(os.getpid(), signal.SIGKILL)
            fill(e, counting_write)
        return write_epoch(self, tmp, epoch, fill_then_die, every_sample)

    TeacherOutputStore._write_epoch = killed_half_way_through_epoch_1
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[1:], return_hydra_config=True)
    cache_teacher(cfg, epochs=2)
    """
)


@pytest.mark.slow
def test_a_cache_killed_while_writing_is_detected_and_rebuilt(make_cfg, tmp_path, cache_dir):
    overrides = [*FAST, f"teacher.cache={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_WRITING, *overrides, f"paths.cache_dir={cache_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [folder] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert json.loads((folder / "manifest.json").read_text())["epochs"] == [0]
    assert list(folder.glob(".epoch-0001.npy.*.tmp")) and not (folder / "epoch-0001.npy").exists()
    assert not (tmp_path / "out" / "results.json").exists()

    store, written = open_cache(make_cfg(*overrides), epochs=2)
    assert store.folder == folder and written == [1]  # epoch 0 reused, the half-written epoch 1 rebuilt
    assert not list(folder.glob(".*.tmp"))
    clean, _ = open_cache(make_cfg(*overrides, f"teacher.cache={tmp_path / 'clean'}"), epochs=2)
    for epoch in (0, 1):
        assert np.load(store.epoch_path(epoch)).tobytes() == np.load(clean.epoch_path(epoch)).tobytes()


def test_a_damaged_or_unlisted_epoch_file_is_written_again(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, f"teacher.cache={tmp_path}")
    store, _ = open_cache(cfg, epochs=2)
    whole = store.epoch_path(1).read_bytes()
    store.epoch_path(1).write_bytes(whole[: len(whole) // 2])  # truncated, yet listed in the manifest
    _, written = open_cache(cfg, epochs=2)
    assert written == [1] and store.epoch_path(1).read_bytes() == whole
    manifest = json.loads(store.manifest_path.read_text())
    manifest["epochs"] = [0]  # killed after the file was renamed into place, before the manifest listed it
    store.manifest_path.write_text(json.dumps(manifest))
    _, written = open_cache(cfg, epochs=2)
    assert written == [1]


def test_a_full_disk_while_writing_an_epoch_keeps_the_manifest_to_complete_epochs(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*FAST, f"teacher.cache={tmp_path}")
    store, _ = open_cache(cfg, epochs=1)
    real = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if Path(dst).name == "epoch-0001.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(KdError, match=r"^could not write the teacher-output cache epoch .*epoch-0001.npy \(No space"):
        open_cache(cfg, epochs=2)
    assert json.loads(store.manifest_path.read_text())["epochs"] == [0]  # only the complete epoch is listed
    assert not store.epoch_path(1).exists() and not list(store.folder.glob(".*.tmp"))
    monkeypatch.setattr(os, "replace", real)  # space again: the next run writes epoch 1 and reuses epoch 0
    _, written = open_cache(cfg, epochs=2)
    assert written == [1]


def test_bn_train_mode_cannot_be_cached(make_cfg, tmp_path):
    from kd.tasks.cache_teacher import cache_teacher

    with pytest.raises(KdError, match="bn_train_mode=true"):
        cache_teacher(make_cfg(*FAST, f"teacher.cache={tmp_path}", "teacher.bn_train_mode=true"))


@pytest.mark.slow
def test_task_cache_teacher_fills_the_cache_that_distill_then_reads(make_cfg, tmp_path, cache_dir):
    cache = tmp_path / "teacher-outputs"
    overrides = (*FAST, "task=cache_teacher", f"teacher.cache={cache}", "task.epochs=1")
    result = run_cli(*overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "cache_teacher" and results["epochs"] == 1 and results["epochs_written"] == [0]
    assert json.loads((Path(results["cache"]) / "manifest.json").read_text())["epochs"] == [0]
    _, written = open_cache(make_cfg(*FAST, f"teacher.cache={cache}", "loss=soft_ce"), epochs=1)
    assert written == []


@pytest.mark.slow
def test_a_random_teacher_cached_ahead_is_reused_by_distill(tmp_path, cache_dir):
    """weights=none: the teacher is built from the run seed, so both tasks must seed alike to agree."""
    cache = tmp_path / "teacher-outputs"
    common = (*FAST, "teacher.weights=none", f"teacher.cache={cache}", "sched.warmup_epochs=0")
    for folder in ("fill", "distill"):
        (tmp_path / folder).mkdir()
    filled = run_cli(*common, "task=cache_teacher", cwd=tmp_path / "fill", cache_dir=cache_dir)
    assert filled.returncode == 0, filled.stderr[-3000:]
    distilled = run_cli(*common, cwd=tmp_path / "distill", cache_dir=cache_dir)
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    assert "teacher outputs: reusing 2 of 2 epochs" in (tmp_path / "distill" / "run.log").read_text()


def test_task_cache_teacher_without_a_folder_stops_before_any_work(make_cfg):
    with pytest.raises(KdError, match=r"^task=cache_teacher needs a folder to write to; pass teacher.cache=DIR$"):
        cache_teacher(make_cfg("task=cache_teacher"))


@pytest.mark.slow
def test_ddp_with_mixup_fills_the_cache_once_and_both_processes_train_on_it(tmp_path, cache_dir):
    # Random models (no weights=auto training): the point is the distributed machinery. 1,437 images on 2
    # processes: 719 each (one image repeated), 11 batches of 64 (the repeat falls into the dropped short batch).
    setup = ["teacher.weights=none", "student.weights=none", "trainer=ddp_cpu", "mixup=mixup_cutmix"]
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "sched.warmup_epochs=0", "logger=csv"]
    cache = f"teacher.cache={tmp_path / 'teacher-outputs'}"
    runs = {}
    for name, extra in (("plain", []), ("cached", [cache])):
        folder = tmp_path / name
        folder.mkdir()
        result = run_cli(*setup, *short, *extra, cwd=folder, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = folder

    rank0, rank1 = ((runs["cached"] / log).read_text() for log in ("run.log", "train_ddp_process_1.log"))
    assert "teacher outputs: wrote epoch 0" in rank0 and "process 1 of 2" in rank0
    assert "teacher outputs: wrote epoch" not in rank1 and "reusing 1 of 1 epochs" in rank1
    assert "process 2 of 2" in rank1
    exact, stored = (np.array(step_losses(runs[name])) for name in ("plain", "cached"))
    assert len(exact) == len(stored) == 4  # rank 0's losses; rank 1 trained on its own batches of the same cache
    assert np.allclose(stored, exact, rtol=2e-4, atol=0), (stored, exact)


@pytest.mark.parametrize(
    ("trainer_overrides", "epochs"),
    [
        (["trainer.max_epochs=4"], 4),
        # 22 batches of 64 per epoch; half of them: 11 steps per epoch, so 30 steps start a third epoch
        (["trainer.max_epochs=-1", "trainer.max_steps=30", "trainer.limit_train_batches=0.5"], 3),
        (["trainer.max_epochs=-1", "trainer.max_steps=30", "trainer.accumulate_grad_batches=2"], 3),
        (["trainer.max_epochs=2", "trainer.max_steps=1000"], 2),
    ],
)
def test_the_cache_covers_every_epoch_the_trainer_will_start(make_cfg, trainer_overrides, epochs):
    cfg = make_cfg(*trainer_overrides)
    assert epochs_to_cover(planned_trainer(cfg), build_data(cfg, cfg.student)) == epochs


def test_a_cache_for_an_unlimited_run_is_refused(make_cfg):
    cfg = make_cfg("trainer.max_epochs=-1", "trainer.max_steps=-1")
    with pytest.raises(KdError, match="trainer.max_epochs and trainer.max_steps are both unlimited"):
        epochs_to_cover(planned_trainer(cfg), build_data(cfg, cfg.student))
