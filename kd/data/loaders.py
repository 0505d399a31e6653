"""A user's own DataLoaders behind kd's data module interface (``kd.distill`` trains on them).

The loaders are used exactly as built: their dataset, sampler, batch size, workers and collate function. So the
batches are the user's ``(images, labels)``, without kd's view ids: the teacher-output cache, which looks the
teacher's outputs up by view id, and an exact mid-epoch resume need one of kd's data modules instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader

from kd.data.base import ClassificationData
from kd.errors import KdError


class LoaderData(ClassificationData):
    """``train_loader`` and ``val_loader`` as a ``ClassificationData`` (``class_names`` default to "0", "1", ...)."""

    def __init__(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        num_classes: int,
        class_names: Sequence[str] | None = None,
    ) -> None:
        for role, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
            if not isinstance(loader, DataLoader):
                raise KdError(
                    f"{role} must be a torch.utils.data.DataLoader, got {type(loader).__name__}; wrap the data in "
                    "DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)"
                )
        if train_loader.batch_size is None:
            raise KdError(
                "train_loader has a batch_sampler, so kd cannot tell its batch size; build it with batch_size= (and "
                "shuffle=True or a sampler)"
            )
        super().__init__(train_loader.batch_size, train_loader.num_workers, val_loader.batch_size)
        names = [str(name) for name in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise KdError(f"class_names lists {len(names)} classes but the models predict {num_classes}; list each one")
        self.class_names = names
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.train_set = train_loader.dataset
        self.val_set = val_loader.dataset

    def batches_per_epoch(self, num_replicas: int) -> int:
        if num_replicas != 1:
            raise KdError(
                f"kd.distill trains on the given DataLoaders in one process, not {num_replicas}; leave trainer.devices "
                "at 1, or use python run.py for several devices"
            )
        return len(self.train_loader)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return self.val_loader

    def describe(self) -> dict:
        """What the run config records as its data: the loaders' settings (their data lives in Python only)."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__name__}",
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "num_workers": self.num_workers,
            "train_samples": len(self.train_set),
            "val_samples": len(self.val_set),
            "num_classes": self.num_classes,
        }
