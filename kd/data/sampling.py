"""Sampling that a resumed run reproduces exactly, and validation that sees every sample exactly once.

Training order is a permutation drawn from (seed, epoch) (torch's ``DistributedSampler``, with one replica on
a single process), and each training view is drawn from torch's RNG seeded by (seed, epoch, index). So the
batches of any epoch can be rebuilt: they depend neither on what ran before, nor on which process or
DataLoader worker loads a sample. A run resumed in the middle of an epoch skips the batches it already
trained on and sees the rest exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from kd.errors import KdError

#: Written into every teacher-output cache manifest: change it whenever the seeding below changes.
SEEDING = (
    "order: DistributedSampler(seed, epoch); view: torch default generator seeded by SeedSequence(seed, epoch, index)"
)
#: The epoch in the view id of a sample loaded by a plain index, without reseeding.
UNSEEDED = -1


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
    ``views[(index, epoch)]`` is ``(image, target, view_id)`` with ``view_id = tensor([index, epoch])``, so each
    training batch carries the ids of its views (a cached teacher looks its outputs up by them). A plain integer
    key (a sequential sampler that Lightning swaps in for ``overfit_batches``) loads the sample without
    reseeding; its view id has epoch -1: "not a seeded view".
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any, torch.Tensor]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> list[tuple[Any, Any, torch.Tensor]]:
        """A whole batch (the DataLoader calls this when it exists): the generator's state is saved and restored
        once per batch instead of once per sample."""
        if all(isinstance(key, int) for key in keys):  # unseeded: draw from the generator as it stands
            return [(*self.dataset[key], torch.tensor([key, UNSEEDED])) for key in keys]
        generator = torch.default_generator  # CPU only: seeding CUDA here would disturb the model's RNG
        state = generator.get_state()
        samples = []
        try:
            for key in keys:
                if isinstance(key, int):
                    samples.append((*self.dataset[key], torch.tensor([key, UNSEEDED])))
                    continue
                index, epoch = key
                generator.manual_seed(view_seed(self.seed, epoch, index))
                image, target = self.dataset[index]
                samples.append((image, target, torch.tensor([index, epoch])))
        finally:
            generator.set_state(state)
        return samples

    def describe(self) -> str:
        """What decides the views besides (seed, epoch, index): the transform (or the dataset) and the seeding."""
        transform = getattr(self.dataset, "transform", None)
        return f"{transform if transform is not None else self.dataset!r} | {SEEDING}"


def check_reproducible(views: SeededViews, probes: int = 2) -> None:
    """Builds a few views twice, with every global random generator disturbed in between, and stops with one
    sentence when they differ (a transform drawing from Python's or NumPy's generator instead of torch's)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        for index in range(min(probes, len(views))):
            first = views[(index, 0)][0]
            random.seed(random.random())
            np.random.seed(np.random.randint(2**31))
            torch.default_generator.manual_seed(int(torch.randint(2**31, (1,))))
            again = views[(index, 0)][0]
            if not torch.equal(torch.as_tensor(first), torch.as_tensor(again)):
                transform = views.describe().split(" | ")[0].replace("\n", " ")
                raise KdError(
                    f"the training transform gave two different views of sample {index} for the same seed "
                    f"({transform}); it draws random numbers outside torch's generator (Python random or NumPy), so "
                    "its views cannot be rebuilt for the teacher-output cache: use torchvision transforms or "
                    "teacher.cache=null"
                )
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def validation_sampler(dataset: Dataset, num_replicas: int, rank: int) -> Sampler | None:
    """Under DDP every process gets its share of the validation set without padding (a padded sampler would
    count the repeated samples twice); the metrics are synchronized across processes at compute time."""
    if num_replicas <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def unlabeled_per_batch(ratio: float, batch_size: int) -> int:
    """The unlabeled images in each training batch for ``data.unlabeled_ratio``."""
    if not 0.0 < ratio <= 1.0:
        raise KdError(
            f"data.unlabeled_ratio={ratio} must lie in (0, 1] (the unlabeled share of each batch), or be null "
            "for the natural mix"
        )
    count = int(math.floor(ratio * batch_size + 0.5))
    if count == 0 or (count == batch_size and ratio < 1.0):
        raise KdError(
            f"data.unlabeled_ratio={ratio} gives {count} unlabeled images in a batch of {batch_size}; choose a "
            "ratio that leaves at least one image of each kind, or 1 for unlabeled images only"
        )
    return count


def padded_share(permutation: list[int], num_replicas: int, rank: int) -> list[int]:
    """Process ``rank``'s strided share of ``permutation``, padded from its start to divide evenly (as
    torch's DistributedSampler pads)."""
    total = math.ceil(len(permutation) / num_replicas) * num_replicas
    padded = (permutation * math.ceil(total / len(permutation)))[:total]
    return padded[rank::num_replicas]


class RatioSampler(ResumableSampler):
    """Batches of ``batch_size`` with ``per_batch`` unlabeled images each (``data.unlabeled_ratio``).

    An epoch is one pass over the labeled images (every labeled image once per process share, none dropped: the
    last batch takes the rest and is filled up with unlabeled images). The unlabeled images come from an endless
    stream of permutations, one per pass over them, drawn from (seed, pass), that continues from epoch to epoch:
    each is used equally often over a run, and an epoch is rebuilt from (seed, epoch) alone. With
    ``per_batch == batch_size`` (ratio 1) an epoch is one pass over the unlabeled images instead. Within a batch
    the order is shuffled by (seed, epoch), so mixup pairs labeled and unlabeled images at random. Keys are
    ``(index, epoch)`` as ``ResumableSampler``'s; ``skip`` leaves out the first samples of ``start_epoch``.
    """

    def __init__(
        self,
        dataset: Dataset,  # kd.data.unlabeled.TrainingSet: labeled images first
        num_replicas: int,
        rank: int,
        seed: int,
        batch_size: int,
        per_batch: int,
        start_epoch: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, seed=seed, start_epoch=start_epoch, skip=skip)
        self.batch_size = batch_size
        self.per_batch = per_batch
        self.labeled_count = dataset.num_labeled
        self.unlabeled_count = dataset.num_unlabeled
        if per_batch < batch_size:
            labeled_share = math.ceil(self.labeled_count / num_replicas)
            self.batches = math.ceil(labeled_share / (batch_size - per_batch))
            self.unlabeled_share = self.batches * batch_size - labeled_share
        else:
            self.batches = math.ceil(math.ceil(self.unlabeled_count / num_replicas) / batch_size)
            self.unlabeled_share = self.batches * batch_size
        self.num_samples = self.batches * batch_size
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, count: int, *key: int) -> list[int]:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]))
        return torch.randperm(count, generator=generator).tolist()

    def unlabeled_stream(self, epoch: int) -> list[int]:
        """This process's unlabeled images for ``epoch``: positions of the run-long stream of permutations."""
        per_epoch = self.unlabeled_share * self.num_replicas
        start, stop = epoch * per_epoch, (epoch + 1) * per_epoch
        count = self.unlabeled_count
        stream: list[int] = []
        for lap in range(start // count, (stop - 1) // count + 1):
            stream += self.permutation(count, 1, lap)
        offset = (start // count) * count
        chosen = stream[start - offset : stop - offset]
        return [self.labeled_count + i for i in chosen[self.rank :: self.num_replicas]]

    def epoch_keys(self, epoch: int) -> list[int]:
        labeled = []
        if self.per_batch < self.batch_size:
            labeled = padded_share(self.permutation(self.labeled_count, 0, epoch), self.num_replicas, self.rank)
        unlabeled = self.unlabeled_stream(epoch)
        labeled_per_batch = self.batch_size - self.per_batch
        order: list[int] = []
        used = 0  # unlabeled images taken so far this epoch
        for batch in range(self.batches):
            take = labeled[batch * labeled_per_batch : (batch + 1) * labeled_per_batch]
            need = self.batch_size - len(take)
            members = take + unlabeled[used : used + need]
            used += need
            shuffle = self.permutation(len(members), 2, epoch, self.rank, batch)
            order += [members[i] for i in shuffle]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = self.epoch_keys(epoch)
        if epoch == self.start_epoch:
            indices = indices[self.skip :]
        return iter([(index, epoch) for index in indices])
