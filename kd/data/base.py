from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from kd.data.sampling import ResumableSampler, SeededViews, run_seed, validation_sampler


class ClassificationData(L.LightningDataModule):
    """Shared loader logic. Subclasses set ``train_set``, ``val_set``, ``class_names`` in ``setup``.

    Training batches come from ``kd.data.sampling`` (order and views reproducible from seed and epoch), and the
    module's ``state_dict`` records how far training got in the data, so a resumed run continues there.
    """

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.resume_position: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank) of the trainer using this data; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        num_replicas, rank = self.replicas()
        if train:
            position = self.resume_position
            sampler = ResumableSampler(
                dataset,
                num_replicas,
                rank,
                seed=run_seed(),
                start_epoch=position.get("epoch", 0),
                skip=position.get("batches_done", 0) * self.batch_size,
            )
            dataset, per_process = SeededViews(dataset, sampler.seed), sampler.num_samples
        else:
            sampler = validation_sampler(dataset, num_replicas, rank)
            per_process = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            # A last batch of a few images gives noisy BatchNorm statistics (and 1 image breaks it).
            drop_last=train and per_process > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """How far training got in the data when a checkpoint is written (Lightning stores it in the checkpoint)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        num_replicas, _ = self.replicas()
        return {
            "train_position": {
                "epoch": epoch,
                "batches_done": done,
                "batch_size": self.batch_size,
                "num_replicas": num_replicas,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when resuming, before it asks for the training loader."""
        self.resume_position = dict(state_dict.get("train_position", {}))
