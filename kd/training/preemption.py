"""A preempted run stops at a step boundary with its state in ``checkpoints/last.ckpt``, and says how to resume.

Lightning's signal connector already turns SIGTERM into a stop after the current training step (it raises
``SIGTERMException`` there, in every DDP process). kd adds what a resume needs: ``Checkpoint`` writes
``last.ckpt`` at that step (``kd.training.resume``), and ``Preempted`` carries one line saying how to resume.

Under SLURM (Lightning's ``SLURMEnvironment`` with ``auto_requeue``) SIGUSR1 (``requeue_signal``), sent ahead of
the time limit with ``#SBATCH --signal=SIGUSR1@90``, is handled here instead of by Lightning's own handler, which
would save a checkpoint in the middle of a step: kd stops at the next step boundary as for SIGTERM, writes
``last.ckpt``, then requeues the job (``scontrol requeue``, as Lightning does). The requeued job, started with
the same ``hydra.run.dir``, resumes from that ``last.ckpt`` by itself (``requeued_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger("kd")


class Preempted(Exception):  # noqa: N818 - what happened, not a failure of the run's settings
    """The run was stopped by a signal after a whole step; its message says how to resume."""


def slurm_requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
    """SIGUSR1 (or the environment's requeue signal) when Lightning runs under SLURM with auto-requeue."""
    # Where Lightning's own signal connector looks: a single-device strategy has no cluster_environment.
    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal or signal.SIGUSR1
    return None


class StopOnRequeueSignal(L.Callback):
    """Under SLURM, SIGUSR1 stops training at the next step boundary, then the job is requeued.

    The handler is installed in ``setup``, before Lightning installs its own (Lightning leaves a signal that
    already has a handler alone), and removed in ``teardown``.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.received = False
        self._previous = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signal = slurm_requeue_signal(trainer)
        if self.signal is None or stage != "fit":
            return
        self._previous = signal.signal(self.signal, self._handle)

    def _handle(self, signum: int, frame) -> None:
        log.info("received %s: stopping after this step to requeue the job", signal.Signals(signum).name)
        self.received = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: a stop at the step boundary, every rank

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.signal is not None and self._previous is not None:
            signal.signal(self.signal, self._previous)
            self._previous = None

    def requeue(self, trainer: L.Trainer) -> bool:
        """``scontrol requeue`` this job (rank 0 only), as Lightning's SLURM handler does; True if it worked."""
        if not (self.received and trainer.is_global_zero):
            return False
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
        if not re.fullmatch(r"[0-9_]+", job):
            return False
        try:
            done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
        except OSError as error:
            log.warning("could not requeue SLURM job %s: %s", job, error)
            return False
        if not done:
            log.warning("scontrol requeue %s failed", job)
        return done


def preempted(trainer: L.Trainer, stopper: StopOnRequeueSignal, command: str) -> Preempted:
    """The run stopped at a step boundary (Lightning's ``SIGTERMException``): requeue it under SLURM, and say how
    it resumes in one line."""
    requeued = stopper.requeue(trainer)
    reason = stopper.signal.name if stopper.received and stopper.signal is not None else "SIGTERM"
    callback = trainer.checkpoint_callback
    last = Path(callback.last_model_path) if callback is not None and callback.last_model_path else None
    step, epoch = trainer.global_step, trainer.current_epoch
    if last is None or not last.exists():
        return Preempted(f"stopped by {reason} at step {step} (epoch {epoch}), with no checkpoint to resume from")
    then = "the requeued job resumes from it" if requeued else f"resume with: {command} ckpt_path=last"
    return Preempted(f"stopped by {reason} after step {step} (epoch {epoch}); its state is in {last}: {then}")


def requeued_checkpoint(folder: Path | None) -> Path | None:
    """The ``last.ckpt`` a requeued SLURM job (``SLURM_RESTART_COUNT`` >= 1) resumes from by itself."""
    if folder is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    last = folder / "last.ckpt"
    return last if last.exists() else None
