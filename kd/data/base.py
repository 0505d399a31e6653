from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset


class ClassificationData(L.LightningDataModule):
    """Shared loader logic. Subclasses set ``train_set``, ``val_set``, ``class_names`` in ``setup``."""

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            # A last batch of a few images gives noisy BatchNorm statistics (and 1 image breaks it).
            drop_last=train and len(dataset) > self.batch_size,
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
