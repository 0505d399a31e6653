from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from kd.data.sampling import ResumableSampler, SeededViews, run_seed, validation_sampler


class ClassificationData(L.LightningDataModule):
    """Shared loader logic. Subclasses set ``train_set``, ``val_set``, ``class_names`` in ``setup``.

    Training batches come from ``kd.data.sampling`` (order and views reproducible from seed and epoch), and the
    module's ``state_dict`` records how far training got in the data, so a resumed run continues there. They are
    ``(images, targets, view_ids)``: ``view_ids`` holds (sample index, epoch) per image, the key of its view.
    Validation batches are ``(images, targets)``: their views have no randomness.
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

    def training_loader(
        self, num_replicas: int, rank: int, seed: int, start_epoch: int = 0, skip: int = 0
    ) -> DataLoader:
        """The training batches of process ``rank`` of ``num_replicas``, starting ``skip`` samples into
        ``start_epoch``. Also what the teacher-output cache replays to see the batches a run will train on."""
        sampler = ResumableSampler(self.train_set, num_replicas, rank, seed=seed, start_epoch=start_epoch, skip=skip)
        return self.loader(SeededViews(self.train_set, sampler.seed), sampler, sampler.num_samples, train=True)

    def loader(self, dataset: Dataset, sampler: Sampler | None, per_process: int, train: bool) -> DataLoader:
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
        num_replicas, rank = self.replicas()
        position = self.resume_position
        skip = position.get("batches_done", 0) * self.batch_size
        return self.training_loader(num_replicas, rank, run_seed(), position.get("epoch", 0), skip)

    def val_dataloader(self) -> DataLoader:
        num_replicas, rank = self.replicas()
        sampler = validation_sampler(self.val_set, num_replicas, rank)
        per_process = len(sampler) if sampler is not None else len(self.val_set)
        return self.loader(self.val_set, sampler, per_process, train=False)

    def own_view_set(self, image_size: int, interpolation: str, crop_pct: float) -> Dataset | None:
        """The validation images in another model's own view (its resize and crop), where it differs from
        ``val_set``'s. Data whose images come at one fixed size (digits, CIFAR, fake) has no other view than
        those images, which that model sees resized: None."""
        return None

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
