"""The checkpoint's guard, a Lightning callback: a checkpoint with NaN or infinite weights would replace the last
good one, so it is refused before it is written. ``DistillationModule.configure_callbacks`` returns it, so a user's
own ``L.Trainer`` gets it too.

Lightning calls the callbacks' ``on_save_checkpoint`` on the whole checkpoint before writing it; the error is a
``NonFiniteError``, which kd's ``Checkpoint`` does not save on (``save_on_exception``), so nothing is written.
"""

from __future__ import annotations

import lightning as L

from kd.errors import NonFiniteError


class FiniteCheckpoints(L.Callback):
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        broken = next(
            (k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()), None
        )
        if broken is not None:
            raise NonFiniteError(
                f"the student's weights became non-finite ({broken}) by step {pl_module.global_step}, so the run "
                f"stopped and kept its last good checkpoint; {remedy(str(getattr(trainer, 'precision', '32-true')))}"
            )


def remedy(precision: str) -> str:
    """What to try. In reduced precision first float32: PyTorch's CPU bf16 convolution can return NaN weight
    gradients for a kernel larger than its 1x1 input map (a 5-stage ResNet on 8x8 images), with a finite loss."""
    fixes = "lower optim.lr or clip gradients (trainer.gradient_clip_val=1.0)"
    return fixes if precision.startswith(("32", "64")) else f"train in float32 (trainer.precision=32-true), {fixes}"
