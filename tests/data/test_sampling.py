"""The data module's share of an exact resume and of DDP validation, through real Lightning trainers, in seconds."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Subset

from kd.data.digits import DigitsData


class RecordsViews(L.LightningModule):
    """A linear classifier that records the view ids of every training batch it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):
        images, target, view_ids = batch
        self.seen.append(view_ids.tolist())
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(folder, ckpt_path=None) -> list[list[list[int]]]:
    """2 epochs of 5 batches (180 digits, batch 32, the short last one dropped); a checkpoint after every step
    (``step=1.ckpt``, ...)."""
    L.seed_everything(0, verbose=False)  # the run seed the sampler reads
    every_step = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[every_step],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = RecordsViews()
    trainer.fit(module, datamodule=DigitsData(batch_size=32, val_fraction=0.9), ckpt_path=ckpt_path)
    return module.seen


def test_a_run_resumed_mid_epoch_gets_the_next_batch_first(tmp_path):
    """The data module's state in a checkpoint says how far the epoch got; the resumed loader continues there."""
    seen = train(tmp_path)
    assert len(seen) == 10
    for step in (2, 7):  # in the first epoch, and 2 batches into the second
        resumed = train(tmp_path / f"from-{step}", ckpt_path=tmp_path / f"step={step}.ckpt")
        assert resumed[0] == seen[step], f"resumed at step {step}: its first batch is not the next one"
        assert resumed == seen[step:]


def test_validation_under_two_processes_sees_each_image_once(monkeypatch):
    """Each of 2 DDP processes validates on its own share, unpadded: kd's UnrepeatedDistributedSampler."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    for flag in (rank_zero_only, fabric_rank_zero):  # a DDP trainer sets the process's rank: later tests need 0
        monkeypatch.setattr(flag, "rank", getattr(flag, "rank", 0))
    data = DigitsData(batch_size=64)
    data.setup("fit")
    data.val_set = Subset(data.val_set, range(359))  # an odd count: a padded sampler would repeat one image
    shares = []
    for each in (0, 1):
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_progress_bar=False)
        trainer.strategy.cluster_environment.set_global_rank(each)  # as Lightning sets it in process `each`
        data.trainer = trainer
        assert (trainer.world_size, trainer.global_rank) == (2, each)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        shares.append(list(loader.sampler))
    assert sorted(shares[0] + shares[1]) == list(range(359))  # every image exactly once
    assert [len(share) for share in shares] == [180, 179]
