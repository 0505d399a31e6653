"""What a batch must look like: ``(images, labels)``, or kd's ``(images, labels, view_ids[, teacher_images])``.

kd's own data modules add ``view_ids`` to training batches (``kd.data.sampling``); a user's DataLoader does not,
and needs not: only the teacher-output cache reads them. Under ``teacher.view=fixed`` or ``independent`` they also
add the teacher's own images (``kd.data.augment``). Anything else is refused in one sentence, so a batch of
the wrong shape fails at its first step instead of deep inside a network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd.data.unlabeled import UNLABELED
from kd.errors import KdError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def unpack_batch(
    batch: object, in_chans: int, num_classes: int, check_values: bool = False, soft: bool = True
) -> Batch:
    """``(images, target, view_ids or None)`` of a batch, after checking its shape (``teacher_images`` gives the
    fourth item of a batch that has one).

    images: floating (N, C, H, W) with C the model's channel count (or 1 for an RGB model); target: N class
    indices, or (N, num_classes) class probabilities when ``soft`` (training). ``check_values`` also checks that
    the class indices are in range (one device sync, so the module does it on the first batch of each epoch only).
    """
    if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) not in (2, 3, 4):
        size = f" of {len(batch)} items" if isinstance(batch, Sequence) else ""
        raise KdError(
            f"a batch must be (images, labels) or (images, labels, view_ids), but it is {describe(batch)}{size}; "
            "make the DataLoader yield (images, labels) pairs"
        )
    images, target = batch[0], batch[1]
    view_ids = batch[2] if len(batch) >= 3 else None
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise KdError(
            f"the images of a batch must be a float tensor (N, C, H, W) with values in [0, 1], but they are "
            f"{describe(images)}; convert them (torchvision's ToTensor or ToDtype(torch.float32, scale=True))"
        )
    if images.shape[1] != in_chans and not (images.shape[1] == 1 and in_chans == 3):
        raise KdError(
            f"the images of a batch have {images.shape[1]} channels (shape {tuple(images.shape)}) but the model takes "
            f"{in_chans}; give images as (N, C, H, W) with C = {in_chans}"
        )
    n = images.shape[0]
    indices = isinstance(target, torch.Tensor) and target.dim() == 1 and not target.is_floating_point()
    probabilities = soft and isinstance(target, torch.Tensor) and target.is_floating_point() and target.dim() == 2
    if not (indices or probabilities) or target.shape[0] != n or (probabilities and target.shape[1] != num_classes):
        raise KdError(
            f"the labels of a batch of {n} images must be {n} class indices (an integer tensor) or ({n}, "
            f"{num_classes}) class probabilities, but they are {describe(target)}; yield (images, labels) pairs"
        )
    # UNLABELED (-1) marks an image without a label (data.unlabeled, data.labeled_fraction): label terms skip it.
    known = target != UNLABELED if indices else None
    if check_values and indices and n and not bool(((target >= 0) & (target < num_classes) | ~known).all()):
        raise KdError(
            f"a batch has labels from {int(target.min())} to {int(target.max())}, outside the {num_classes} classes "
            f"the models predict (0 to {num_classes - 1}); relabel the data or use models for its classes"
        )
    return images, target, view_ids


def teacher_images(batch: Sequence, images: torch.Tensor) -> torch.Tensor | None:
    """The teacher's own images of a ``(images, labels, view_ids, teacher_images)`` batch (``teacher.view=fixed``
    or ``independent``), checked against the student's ``images``; None for a batch without them."""
    if len(batch) < 4:
        return None
    own = batch[3]
    if not isinstance(own, torch.Tensor) or own.dim() != 4 or own.shape[:2] != images.shape[:2]:
        raise KdError(
            f"the teacher's images of a batch must be a tensor (N, C, H, W) like the student's {tuple(images.shape)}, "
            f"but they are {describe(own)}; yield (images, labels, view_ids, teacher_images)"
        )
    return own
