"""Seeded training views: the view of sample i in epoch e is a pure function of (seed, e, i).

Every random decision of a training transform (crop box, flip, colour jitter, the digits shift) is
drawn from torch's default CPU generator, which ``SeededViews`` re-seeds from ``(seed, epoch, index)``
around each sample and then restores. So the exact view the student trained on can be rebuilt at
any time, in any process, by ``SeededViews(dataset, seed)[(epoch, index)]``; the teacher-output cache
relies on it. Transforms must draw from torch's generator (all torchvision transforms do); one that
uses Python's ``random`` or NumPy is caught by ``check_reproducible`` before a cache is used.

The epoch travels with the index: ``ViewSampler`` yields ``(epoch, index)`` pairs, so DataLoader
workers (persistent or not) never need to be told the epoch, and each batch carries the ids of its
views as a ``(batch, 2)`` tensor of (epoch, index).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kd.errors import KdError

#: Written into every teacher-output cache manifest: change it whenever the seeding below changes.
SEEDING = "torch default generator re-seeded per view with blake2b(seed:epoch:index), order blake2b(seed:epoch)"

ViewId = tuple[int, int]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts; nearby inputs (epoch 1 vs 2) give unrelated seeds."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def view_seed(seed: int, epoch: int, index: int) -> int:
    return derive_seed("view", seed, epoch, index)


class SeededViews(Dataset):
    """Wraps a ``(image, target)`` dataset; ``dataset[(epoch, index)]`` is ``(view, target, [epoch, index])``.

    A plain integer key means epoch 0 (Lightning's ``overfit_batches`` swaps in a sequential sampler).
    The default generator's state is saved and restored around each sample, so with ``num_workers=0``
    the training loop's own random stream (dropout, drop-path) is untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ViewId | int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[ViewId | int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """A whole batch at once (the DataLoader calls this when it exists): the generator's state is
        saved and restored once per batch rather than once per sample."""
        ids = [self._key(key) for key in keys]
        generator = torch.default_generator
        state = generator.get_state()
        try:
            samples = []
            for epoch, index in ids:
                generator.manual_seed(view_seed(self.seed, epoch, index))
                samples.append(self.dataset[index])
        finally:
            generator.set_state(state)
        view_ids = torch.tensor(ids)
        return [(image, target, view_id) for (image, target), view_id in zip(samples, view_ids, strict=True)]

    @staticmethod
    def _key(key: ViewId | int) -> ViewId:
        try:
            epoch, index = key
        except TypeError:  # a bare index (a sequential sampler swapped in by Lightning's overfit_batches)
            epoch, index = 0, key
        return int(epoch), int(index)

    def describe(self) -> str:
        """What decides the views: the transform (or the dataset's own repr) and the seeding scheme."""
        transform = getattr(self.dataset, "transform", None)
        return f"{transform if transform is not None else self.dataset!r} | {SEEDING}"


class ViewSampler(Sampler[ViewId]):
    """Yields ``(epoch, index)`` for every sample; shuffled by a permutation seeded from (seed, epoch).

    Lightning calls ``set_epoch`` before each training epoch (also through its DDP sampler wrapper).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, epoch: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[ViewId]:
        epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter([(epoch, index) for index in order])


def check_reproducible(views: SeededViews, probes: int = 2) -> None:
    """Builds a few views twice, with every global random generator disturbed in between, and stops
    with a clear error when they differ (a transform drawing from Python's or NumPy's generator)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        for index in range(min(probes, len(views))):
            first = views[(0, index)][0]
            random.seed(random.random())
            np.random.seed(np.random.randint(2**31))
            torch.default_generator.manual_seed(torch.randint(2**31, (1,)).item())
            again = views[(0, index)][0]
            if not torch.equal(torch.as_tensor(first), torch.as_tensor(again)):
                raise_not_reproducible(views, index)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def raise_not_reproducible(views: SeededViews, index: int) -> None:
    transform = views.describe().split(" | ")[0].replace("\n", " ")
    raise KdError(
        f"the training transform gave two different views of sample {index} for the same seed ({transform}); "
        "it draws random numbers outside torch's generator (Python random or NumPy), so its views cannot be "
        "rebuilt for the teacher-output cache: use torchvision transforms or teacher.cache=null"
    )
