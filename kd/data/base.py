from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from kd.data.views import SeededViews, ViewSampler


class ClassificationData(L.LightningDataModule):
    """Shared loader logic. Subclasses set ``train_set``, ``val_set``, ``class_names`` in ``setup``.

    Training batches are ``(images, targets, view_ids)``: every view is seeded by (``seed``, epoch,
    sample index) and ``view_ids`` holds (epoch, index) per image (see ``kd.data.views``). Validation
    batches are ``(images, targets)``: their views have no randomness.
    """

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]
    #: The run's seed (set by the task): it decides the training order and every random view.
    seed: int = 0

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_views(self) -> SeededViews:
        return SeededViews(self.train_set, self.seed)

    def loader(self, dataset: Dataset, train: bool, sampler: ViewSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            # A last batch of a few images gives noisy BatchNorm statistics (and 1 image breaks it).
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning creates the first iterator before its first set_epoch call (and, on resume, before
        # the restored epoch is set), so the sampler starts at the trainer's current epoch.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = ViewSampler(len(self.train_set), self.seed, shuffle=True, epoch=epoch)
        return self.loader(self.train_views(), train=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
