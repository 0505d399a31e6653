"""Sampling that a resumed run reproduces exactly, and validation that sees every sample exactly once.

Training order is a permutation drawn from (seed, epoch) (torch's ``DistributedSampler``, with one replica on
a single process), and each training view is drawn from torch's RNG seeded by (seed, epoch, index). So the
batches of any epoch can be rebuilt: they depend neither on what ran before, nor on which process or
DataLoader worker loads a sample. A run resumed in the middle of an epoch skips the batches it already
trained on and sees the rest exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler


def run_seed() -> int:
    """The run's seed, as ``lightning.seed_everything`` published it (Lightning's own samplers use it too)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for the view of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class ResumableSampler(DistributedSampler):
    """Shuffles with a permutation drawn from (seed, epoch) and yields ``(index, epoch)`` keys for ``SeededViews``.

    ``skip`` samples of ``start_epoch`` are left out: the part of that epoch a resumed run already trained on.
    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping it.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_epoch: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch = start_epoch
        self.start_epoch = start_epoch
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = list(super().__iter__())
        if epoch == self.start_epoch:
            indices = indices[self.skip :]
        return iter([(index, epoch) for index in indices])


class SeededViews(Dataset):
    """Draws the view of ``(index, epoch)`` from torch's RNG seeded by (seed, epoch, index).

    Transforms that take their randomness from torch's global RNG (torchvision's all do) then give the same view
    for the same sample and epoch wherever it is loaded. The caller's RNG state is restored afterwards.
    Plain integer keys load the sample without reseeding.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, epoch = key
        generator = torch.default_generator  # CPU only: seeding CUDA here would disturb the model's RNG
        state = generator.get_state()
        generator.manual_seed(view_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def validation_sampler(dataset: Dataset, num_replicas: int, rank: int) -> Sampler | None:
    """Under DDP every process gets its share of the validation set without padding (a padded sampler would
    count the repeated samples twice); the metrics are synchronized across processes at compute time."""
    if num_replicas <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
