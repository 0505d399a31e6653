"""Small callbacks Lightning does not ship: training throughput, one plain line per epoch, validation history."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger("kd")


class TrainThroughput(L.Callback):
    """Images per second over the training batches, data loading included, validation excluded."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch starts without an epoch start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.seconds += now - self._last
        self._last = now
        self.images += batch[0].shape[0] * trainer.world_size

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class EpochLine(L.Callback):
    """One log line per epoch with the key metrics: readable where no progress bar can draw (CI logs)."""

    keys = ("train/loss", "student/top1", "student/top5", "student_ema/top1", "agreement")

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4f}" for k in self.keys if isinstance(metrics.get(k), torch.Tensor)]
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        log.info(
            "epoch %d/%d  %s  lr %.4g  %.1f s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            "  ".join(parts),
            lr,
            time.perf_counter() - self._start,
        )


class ValidationHistory(L.Callback):
    """The validation metrics after every validation during fit, for the sweep summary's curves."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # epoch metrics are computed by now
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        fraction = min(1.0, batches_done / trainer.num_training_batches) if trainer.num_training_batches else 1.0
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if not key.startswith(("train/", "lr-")) and isinstance(value, torch.Tensor) and value.numel() == 1
        }
        self.records.append({"epoch": trainer.current_epoch + fraction, "step": trainer.global_step, **metrics})
