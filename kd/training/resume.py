"""Surviving a kill: atomic checkpoints, ``ckpt_path=last``, and everything a resumed run needs to continue
exactly where the killed one stopped.

Lightning restores the student, the optimizer, the LR schedule and the loop counters from a checkpoint. kd adds
the rest: where training stood in the data (``ClassificationData.state_dict``, with ``kd.data.sampling``
making order and views reproducible) and the global RNG states (``RestoreRng``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kd.errors import KdError, NonFiniteError, WriteError
from kd.io import write_atomic
from kd.training.preemption import requeued_checkpoint

log = logging.getLogger("kd")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its destination, flushes it to disk and renames it.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy (not atomic)
    whenever that folder is on another filesystem, and does not fsync; a kill then can leave a broken last.ckpt.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp), what="checkpoint")


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with two guarantees kd relies on.

    The final state always reaches ``last.ckpt``, also when checkpoints are written every N steps; and a run
    stopped by a NaN or infinite value never overwrites the last good checkpoint (not even with
    ``save_on_exception``).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # preempted after a whole step (kd.training.preemption)
            if self.save_last and trainer.state.fn == TrainerFn.FITTING and not self.saved_at_this_step(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        if not isinstance(exception, NonFiniteError | WriteError):  # never over a good checkpoint; never twice
            super().on_exception(trainer, pl_module, exception)

    def saved_at_this_step(self, trainer: L.Trainer) -> bool:
        return self._last_global_step_saved == trainer.global_step and Path(self.last_model_path or "/-").exists()


def rng_states() -> dict[str, Any]:
    """The global RNG states as plain values (tensors, ints, lists), which ``torch.load`` reads without pickle."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class RestoreRng(L.Callback):
    """Keeps the global RNG states in every checkpoint and puts them back when a run resumes, just before its
    first step, so anything random in the model (dropout, drop-path) continues as in the uninterrupted run.
    (The data does not need it: its order and views are seeded by epoch and sample, see kd.data.sampling.)"""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in load_state_dict: Lightning draws from the RNG while it sets up (DataLoader seeds) after that.
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def checkpoint_folder(trainer: L.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    return Path(callback.dirpath) if callback is not None and callback.dirpath else None


def resolve_checkpoint(ckpt_path: str | None, trainer: L.Trainer) -> Path | None:
    """The checkpoint to resume from: ``last`` is the newest ``last*.ckpt`` in this run's checkpoint folder."""
    if ckpt_path in (None, ""):
        requeued = requeued_checkpoint(checkpoint_folder(trainer))
        if requeued is not None:
            log.info("this SLURM job was requeued: resuming from %s", requeued)
        return requeued
    if str(ckpt_path) == "last":
        folder = checkpoint_folder(trainer)
        candidates = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
        if not candidates:
            raise KdError(
                f"ckpt_path=last found no checkpoint in {folder}; to resume a run, pass its output folder as "
                "hydra.run.dir=FOLDER together with its original overrides, or drop ckpt_path to start afresh"
            )
        return candidates[-1]
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise KdError(f"ckpt_path={ckpt_path} does not exist; pass a checkpoint file or ckpt_path=last")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file makes torch.load fail in many ways
        raise KdError(
            f"checkpoint {path} cannot be read ({type(error).__name__}); it is truncated or not a kd checkpoint, "
            "so resume from another one or drop ckpt_path"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise KdError(f"{path} is not a training checkpoint of kd; pass a checkpoints/*.ckpt file of a kd run")
    return checkpoint


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, read and checked before any work."""

    path: Path
    checkpoint: dict[str, Any]

    @classmethod
    def find(cls, ckpt_path: str | None, trainer: L.Trainer) -> ResumePoint | None:
        path = resolve_checkpoint(ckpt_path, trainer)
        return cls(path, read_checkpoint(path)) if path is not None else None

    def check(self, module: L.LightningModule, batch_size: int, processes: int) -> None:
        """Refuse a checkpoint that this run cannot continue exactly (its teacher: ``kd.teachers.guards``)."""
        check_student(self.checkpoint, self.path, module)
        check_data_position(self.checkpoint, self.path, {"batch_size": batch_size, "num_replicas": processes})
        log.info(
            "resuming from %s (epoch %d, step %d)", self.path, self.checkpoint["epoch"], self.checkpoint["global_step"]
        )
        self.checkpoint = {}  # Lightning reads the file itself


def check_student(checkpoint: dict[str, Any], path: Path, module: L.LightningModule) -> None:
    own = {k: v.shape for k, v in module.state_dict().items()}
    theirs = {k: v.shape for k, v in checkpoint["state_dict"].items()}
    if own != theirs:
        differing = sorted(set(own) ^ set(theirs)) or sorted(k for k in own if own[k] != theirs[k])
        if differing[0].startswith("student_ema.") and set(own) ^ set(theirs):  # student.ema switched on or off
            saved = "true" if differing[0] in theirs else "false"
            raise KdError(
                f"checkpoint {path} was written with student.ema={saved}, but this run sets the opposite; resume "
                f"with student.ema={saved}"
            )
        raise KdError(
            f"checkpoint {path} holds another student or loss (e.g. {differing[0]}); resume with the student "
            "and loss the run started with"
        )


def check_data_position(checkpoint: dict[str, Any], path: Path, position: dict[str, int]) -> None:
    """The position in the data is counted in batches per process: both must be the same to continue."""
    saved = next(
        (
            state["train_position"]
            for state in checkpoint.values()
            if isinstance(state, dict) and "train_position" in state
        ),
        None,
    )
    for key, setting in (("batch_size", "data.batch_size"), ("num_replicas", "the number of processes")):
        if saved and saved.get(key) != position[key]:
            raise KdError(
                f"checkpoint {path} was written with {setting}={saved.get(key)}, this run has {position[key]}; "
                "resume with the same setting so the data continues where it stopped"
            )
