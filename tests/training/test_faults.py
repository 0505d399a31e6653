"""Faults: a loss that becomes NaN stops the run naming step and term; files are replaced atomically."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kd.errors import NonFiniteError, WriteError
from kd.io import write_json_atomic
from kd.losses import LabelCrossEntropy
from kd.models import Classifier, Preprocessing
from kd.models.convnet import ConvNet
from kd.module import DistillationModule
from kd.tasks.train import fit
from kd.training.guards import FiniteCheckpoints
from kd.training.resume import AtomicCheckpointIO
from tests.conftest import FAST, ROOT

# An absurd learning rate from the first step: the logits overflow at step 1 and the KD term becomes NaN.
DIVERGING = [*FAST, "optim.lr=1e30", "sched.warmup_epochs=0"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # the guard holds in either, whatever the default
def test_a_nan_loss_stops_at_its_step_naming_the_term_and_keeps_the_last_checkpoint(make_cfg, tmp_path, precision):
    cfg = make_cfg(*DIVERGING, "callbacks.checkpoint.every_n_train_steps=1", f"trainer.precision={precision}")
    with pytest.raises(NonFiniteError) as stopped:
        fit(cfg, task="distill")
    assert str(stopped.value) == (
        "the loss term kd became nan at step 1 (epoch 0, batch 1), so the run stopped and kept its last good "
        "checkpoint; lower optim.lr, clip gradients (trainer.gradient_clip_val=1.0) or check the inputs"
    )
    out = tmp_path / "out"
    checkpoint = load(out / "checkpoints" / "last.ckpt")  # written after step 0, before the NaN
    assert checkpoint["global_step"] == 1
    assert all(v.isfinite().all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]


def test_save_on_exception_never_writes_the_state_of_a_diverged_run(make_cfg, tmp_path):
    cfg = make_cfg(
        *DIVERGING, "callbacks.checkpoint.every_n_train_steps=5", "+callbacks.checkpoint.save_on_exception=true"
    )
    with pytest.raises(NonFiniteError, match="at step 1"):
        fit(cfg, task="distill")
    assert not (tmp_path / "out" / "checkpoints").exists()  # Lightning would have saved step 1's weights here


def test_non_finite_weights_are_never_checkpointed():
    student = Classifier(ConvNet(10, width=4, depth=2), Preprocessing((0.5,), (0.5,), (1, 8, 8)))
    module = DistillationModule(student, LabelCrossEntropy(), torch.optim.SGD, None, 10)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    guard = FiniteCheckpoints()  # DistillationModule.configure_callbacks adds it to every Trainer
    guard.on_save_checkpoint(None, module, {"state_dict": state})  # finite: accepted
    state["student.net.fc.bias"][3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the student's weights became non-finite \(student.net.fc.bias\)"):
        guard.on_save_checkpoint(None, module, {"state_dict": state})


class Unpicklable:
    def __reduce__(self):
        raise OSError("No space left on device")


def test_a_checkpoint_that_fails_halfway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(4)}, path)
    with pytest.raises(WriteError, match=r"could not write the checkpoint .*last\.ckpt \(No space left on device\)"):
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(10_000), "broken": Unpicklable()}, path)
    assert load(path)["global_step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left either
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_kill_during_checkpoint_writes_leaves_a_complete_file(tmp_path):
    """A process rewriting a 16 MB checkpoint in a loop is SIGKILLed; what remains loads and is whole."""
    path = tmp_path / "last.ckpt"
    writer = textwrap.dedent(
        f"""
        import torch
        from kd.training.resume import AtomicCheckpointIO
        io, step = AtomicCheckpointIO(), 0
        while True:
            step += 1
            io.save_checkpoint({{"global_step": step, "weights": torch.full((4_000_000,), float(step))}}, {str(path)!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the middle of a later write
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    checkpoint = load(path)
    assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["global_step"])))


def test_results_json_is_replaced_whole_or_not_at_all(tmp_path):
    path = write_json_atomic(tmp_path / "results.json", {"metrics": {"student/top1": 0.9}})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"metrics": {"student/top1": object()}})
    assert json.loads(path.read_text()) == {"metrics": {"student/top1": 0.9}}
    assert os.listdir(tmp_path) == ["results.json"]
