"""The teacher's guard (``kd.teachers.guards.TeacherGuard``) in a user's own Trainer: the module adds it, so a fit
without kd's tasks still refuses a teacher inside the module, one that changed, and a resume with another teacher.
(A teacher in the optimizer: tests/test_library.py.)"""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kd.errors import KdError
from kd.losses import HintonKD
from kd.module import DistillationModule
from tests.tiny_models import tiny_student, tiny_teacher


def images() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator))
    return DataLoader(data, batch_size=8)


def own_trainer(tmp_path, steps: int = 2, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path, num_sanity_val_steps=0, callbacks=list(callbacks),
    )  # fmt: skip


def distillation(teacher_seed: int = 1) -> DistillationModule:
    optimizer = partial(torch.optim.SGD, lr=0.1)
    return DistillationModule(
        tiny_student(), HintonKD(), optimizer, num_classes=10, teacher=tiny_teacher(seed=teacher_seed)
    )


def test_a_teacher_registered_inside_the_module_is_refused_when_training_starts(tmp_path):
    module = distillation()
    module.helper = module.teacher  # an nn.Module attribute: registered, so wrapped and checkpointed with the student
    with pytest.raises(KdError, match="the teacher's parameters are registered inside the LightningModule"):
        own_trainer(tmp_path).fit(module, train_dataloaders=images())


class ChangeTheTeacher(L.Callback):
    """A bug in a custom loss or callback: the teacher's weights move during training."""

    def on_train_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.teacher.parameters()).add_(1.0)


def test_a_teacher_that_changed_during_the_fit_is_refused_at_its_end(tmp_path):
    with pytest.raises(KdError, match=r"the teacher changed during the run \(fingerprint"):
        own_trainer(tmp_path, callbacks=[ChangeTheTeacher()]).fit(distillation(), train_dataloaders=images())


def test_resuming_with_another_teacher_is_refused_and_the_fingerprint_stays_at_the_checkpoints_top(tmp_path):
    first = distillation(teacher_seed=1)
    every_step = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1)
    own_trainer(tmp_path, callbacks=[every_step]).fit(first, train_dataloaders=images())
    path = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    assert torch.load(path, weights_only=True)["teacher_fingerprint"] == first.teacher.start_fingerprint

    same = distillation(teacher_seed=1)  # the same teacher rebuilt: resumes
    own_trainer(tmp_path / "same", steps=3).fit(same, train_dataloaders=images(), ckpt_path=path)
    other = distillation(teacher_seed=2)
    with pytest.raises(KdError, match=rf"checkpoint {path} was distilled from another teacher \(fingerprint"):
        own_trainer(tmp_path / "other", steps=3).fit(other, train_dataloaders=images(), ckpt_path=path)
