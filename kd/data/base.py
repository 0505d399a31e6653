from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from kd.data.sampling import (
    RatioSampler,
    ResumableSampler,
    SeededViews,
    run_seed,
    unlabeled_per_batch,
    validation_sampler,
)
from kd.data.unlabeled import Part, TrainingSet, UnlabeledFolder, check_fraction, labels_of, stratified_fraction
from kd.errors import KdError

log = logging.getLogger("kd")


class ClassificationData(L.LightningDataModule):
    """Shared loader logic. Subclasses set ``train_set``, ``val_set``, ``class_names`` in ``setup``.

    Training batches come from ``kd.data.sampling`` (order and views reproducible from seed and epoch), and the
    module's ``state_dict`` records how far training got in the data, so a resumed run continues there. They are
    ``(images, targets, view_ids)``: ``view_ids`` holds (sample index, epoch) per image, the key of its view.
    Validation batches are ``(images, targets)``: their views have no randomness.

    Every data module takes the unlabeled-data options of ``kd.data.unlabeled`` (``unlabeled``,
    ``unlabeled_ratio``, ``labeled_fraction`` with ``split_seed``, ``bad_images`` for the unlabeled folder);
    its ``setup`` ends with ``add_unlabeled``. A training target of -1 means "no label".
    """

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        unlabeled: str | None = None,
        unlabeled_ratio: float | None = None,
        labeled_fraction: float = 1.0,
        split_seed: int = 0,
        bad_images: str = "stop",
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.resume_position: dict[str, int] = {}
        self.unlabeled = None if unlabeled in (None, "") else str(unlabeled)
        self.labeled_fraction = check_fraction(labeled_fraction)
        self.split_seed = split_seed
        self.bad_images = bad_images
        self.unlabeled_ratio = unlabeled_ratio
        if unlabeled_ratio is not None:
            if self.unlabeled is None and self.labeled_fraction == 1.0:
                raise KdError(
                    f"data.unlabeled_ratio={unlabeled_ratio} needs unlabeled images; pass data.unlabeled=DIR or "
                    "data.labeled_fraction below 1, or set data.unlabeled_ratio=null"
                )
            self.unlabeled_per_batch = unlabeled_per_batch(unlabeled_ratio, batch_size)

    def add_unlabeled(self, view: Callable | None) -> None:
        """Makes ``train_set`` (the labeled training split the subclass built) a ``TrainingSet`` when there are
        unlabeled images: the hidden part of ``labeled_fraction`` and the ``unlabeled`` folder, read with
        ``view`` (a PIL image to this data's training sample). Without them ``train_set`` stays as it is."""
        labeled = self.train_set
        parts: list[Dataset] = []
        if self.labeled_fraction < 1.0:
            kept, hidden = stratified_fraction(labels_of(labeled), self.labeled_fraction, self.split_seed,
                                               self.class_names)  # fmt: skip
            parts.append(Part(labeled, hidden, hide_labels=True))
            labeled = Part(labeled, kept)
        if self.unlabeled is not None:
            if view is None:
                raise KdError(f"data.unlabeled is not supported by {type(self).__name__}; set it to null")
            parts.append(UnlabeledFolder(self.unlabeled, view, self.bad_images))
        if parts:
            self.train_set = TrainingSet(labeled, parts)

    @property
    def num_labeled(self) -> int:
        """Training images with a label."""
        return getattr(self.train_set, "num_labeled", len(self.train_set))

    @property
    def num_unlabeled(self) -> int:
        """Training images without one (the teacher alone teaches them)."""
        return getattr(self.train_set, "num_unlabeled", 0)

    def ratio_mode(self) -> bool:
        return self.unlabeled_ratio is not None and isinstance(self.train_set, TrainingSet)

    def labeled_only(self) -> ClassificationData:
        """This data with the labeled training images alone: ``weights: auto`` pretraining and ``task=train``
        (the honest baseline) never see an unlabeled image, nor a hidden label."""
        if not isinstance(self.train_set, TrainingSet):
            return self
        data = copy.copy(self)
        data.train_set = self.train_set.labeled
        data.unlabeled_ratio = None
        return data

    def samples_per_process(self, num_replicas: int) -> int:
        """Training samples each process loads per epoch (before the DataLoader drops a short last batch)."""
        if self.ratio_mode():
            return len(self.ratio_sampler(num_replicas, 0, 0))
        return -(-len(self.train_set) // num_replicas)

    def ratio_sampler(self, num_replicas: int, rank: int, seed: int, start_epoch: int = 0, skip: int = 0):
        return RatioSampler(
            self.train_set, num_replicas, rank, seed, self.batch_size, self.unlabeled_per_batch, start_epoch, skip
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank) of the trainer using this data; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def batches_per_epoch(self, num_replicas: int) -> int:
        """Training batches per process and epoch, as ``loader`` cuts them (the last one dropped when short)."""
        per_process = self.samples_per_process(num_replicas)
        batches, short = divmod(per_process, self.batch_size)
        return batches if per_process > self.batch_size else batches + bool(short)

    def training_loader(
        self, num_replicas: int, rank: int, seed: int, start_epoch: int = 0, skip: int = 0
    ) -> DataLoader:
        """The training batches of process ``rank`` of ``num_replicas``, starting ``skip`` samples into
        ``start_epoch``. Also what the teacher-output cache replays to see the batches a run will train on."""
        if self.ratio_mode():
            sampler = self.ratio_sampler(num_replicas, rank, seed, start_epoch, skip)
        else:
            sampler = ResumableSampler(self.train_set, num_replicas, rank, seed=seed, start_epoch=start_epoch,
                                       skip=skip)  # fmt: skip
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
