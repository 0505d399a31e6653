"""An exponential moving average of the student's weights (``student.ema=true``), timm's ``ModelEmaV3``.

The average is a registered child of the LightningModule (``student_ema.module.*``), so it is in
``state_dict()`` and every checkpoint (a resumed run continues the same average), but its parameters do
not require gradients, so no optimizer ever holds them. It is updated after every optimizer step with the
step count, as timm's ``train.py`` does: update 1 copies the student (decay 0), later ones decay by
``student.ema_decay``.
"""

from __future__ import annotations

import math
from numbers import Real

from timm.utils.model_ema import ModelEmaV3
from torch import nn

from kd.errors import KdError

DEFAULT_DECAY = 0.9998  # timm train.py's --model-ema-decay


def check_ema_decay(decay: object) -> float:
    """The decay as a float, or a KdError before any work: it must lie strictly between 0 and 1."""
    if isinstance(decay, bool) or not isinstance(decay, Real) or not (0.0 < float(decay) < 1.0) or math.isnan(decay):
        raise KdError(
            f"student.ema_decay={decay!r} must be a number strictly between 0 and 1 (timm uses 0.9998); "
            "set it so or turn the average off with student.ema=false"
        )
    return float(decay)


def student_ema(student: nn.Module, decay: float) -> ModelEmaV3:
    """A frozen copy of ``student`` that ``update(student, step=...)`` moves towards the student's weights."""
    ema = ModelEmaV3(student, decay=check_ema_decay(decay))
    ema.requires_grad_(False)  # never trained: outside every optimizer (they take parameters that require grad)
    # Never run in a training step; validation puts it in eval mode. In train mode Lightning does not warn about it.
    ema.train()
    return ema
