"""The checkpoint's guard (``kd.training.guards.FiniteCheckpoints``) in a user's own Trainer and ModelCheckpoint:
the module adds it, so a checkpoint with NaN or infinite weights is never written."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kd.errors import NonFiniteError
from kd.losses import HintonKD
from kd.module import DistillationModule
from tests.tiny_models import tiny_student, tiny_teacher


class BreakTheStudent(L.Callback):
    """After the second step, one weight of the student becomes infinite (as a diverging run's would)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            with torch.no_grad():
                pl_module.student.net.fc.bias[3] = float("inf")


@pytest.mark.parametrize(
    "precision, advice",
    [("32-true", "; lower optim.lr or clip"), ("bf16-mixed", "; train in float32 (trainer.precision=32-true), lower")],
)
def test_a_checkpoint_with_non_finite_weights_is_never_written_by_a_users_trainer(tmp_path, precision, advice):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    module = DistillationModule(
        tiny_student(), HintonKD(), partial(torch.optim.SGD, lr=0.1), num_classes=10, teacher=tiny_teacher()
    )
    folder = tmp_path / "checkpoints"
    every_step = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)  # runs after BreakTheStudent
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path, callbacks=[BreakTheStudent(), every_step], precision=precision,
    )  # fmt: skip
    with pytest.raises(
        NonFiniteError, match=r"the student's weights became non-finite \(student.net.fc.bias\) by step 2"
    ) as refused:
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8))
    assert advice in str(refused.value) and len(str(refused.value)) < 300
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt"]
