"""Mixup and CutMix (timm's), applied once per training batch, before the teacher and the student see it.

Every random decision (whether to mix, mixup or cutmix, lambda, the cutmix box) is drawn by timm's
``Mixup`` from numpy's random state, which is seeded for the call from (run seed, rank, epoch, batch
index) and restored afterwards: the mixed batch is reproducible from those numbers alone, and nothing
else that uses numpy's global random state is disturbed. The partner of image i is image N - 1 - i of
the same batch (timm's convention), so it is fixed by the batch's composition.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from timm.data import Mixup

from kd.errors import KdError


@contextmanager
def numpy_random_state(*key: int) -> Iterator[None]:
    """Seed numpy's global random state from ``key`` for the block, then put the previous state back."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(key)).generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)


def refuse_odd(batch_size: int, where: str) -> None:
    if batch_size % 2:
        raise KdError(
            f"mixup/cutmix pairs every image with another image of its batch, but {where} is {batch_size}, "
            "an odd number; use an even data.batch_size"
        )


class BatchMixup:
    """timm's ``Mixup`` with its own settings (see conf/mixup/); labels come out as per-class probabilities.

    Unlabeled images (target -1) are mixed as one extra class, whose column is then dropped: a mixed row sums to
    the known share of its image (``kd.losses.labels`` masks the rest), and no label is invented for it.

    Label smoothing is left to the loss (``loss.label_smoothing``), which applies it to these labels.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: list[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0 and cutmix_minmax is None:
            raise KdError("mixup.mixup_alpha and mixup.cutmix_alpha are both 0; make one positive or use mixup=null")
        if mode not in ("batch", "pair", "elem"):
            raise KdError(f"mixup.mode={mode} is not one of batch, pair, elem (timm's modes)")
        if batch_size is not None:
            refuse_odd(batch_size, "data.batch_size")
        self.settings = {
            "mixup_alpha": mixup_alpha,
            "cutmix_alpha": cutmix_alpha,
            "cutmix_minmax": list(cutmix_minmax) if cutmix_minmax is not None else None,
            "prob": prob,
            "switch_prob": switch_prob,
            "mode": mode,
            "correct_lam": correct_lam,
        }
        self.seed = seed

    def __call__(
        self, images: torch.Tensor, target: torch.Tensor, num_classes: int, key: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``images`` (a new tensor; the input is left alone) and return them with the mixed labels.
        ``key`` (rank, epoch, batch index) together with the run seed fixes every random choice."""
        refuse_odd(len(images), "this training batch's size")
        # Class num_classes stands for "no label"; timm's random draws do not depend on the class count.
        mixer = Mixup(**self.settings, label_smoothing=0.0, num_classes=num_classes + 1)
        target = torch.where(target < 0, torch.full_like(target, num_classes), target)
        with numpy_random_state(self.seed, *key):
            mixed, soft = mixer(images.clone(), target)
        return mixed, soft[:, :num_classes]
