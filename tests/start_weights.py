"""A callback for tests: saves the student's weights as ``trainer.fit`` starts, to compare with their source.

Added to a run from its config (``+callbacks.start_weights._target_=tests.start_weights.SaveStartWeights``),
so the run is built exactly as a user's run is.
"""

from __future__ import annotations

import lightning as L
from safetensors.torch import save_file


class SaveStartWeights(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            key: value.detach().cpu().clone().contiguous() for key, value in pl_module.student.net.state_dict().items()
        }
        save_file(state, self.path)
