"""Seeded views: the view of sample i in epoch e is rebuilt bit-identically from (seed, e, i)."""

import random

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from kd.data.sampling import SeededViews, check_reproducible
from kd.data.transforms import train_view
from kd.errors import KdError
from kd.models import Classifier
from kd.module import DistillationModule
from kd.tasks.common import build_data, optimizer_factory


class RecordBatches(L.Callback):
    """Keeps every training batch exactly as the training step received it."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, targets, view_ids = batch
        self.batches.append((trainer.current_epoch, images.clone(), targets.clone(), view_ids.clone()))


def test_a_view_is_a_function_of_seed_epoch_and_index_and_carries_its_id(make_cfg):
    data = build_data(make_cfg(), make_cfg().student)
    views = SeededViews(data.train_set, seed=3)
    rng_before = torch.get_rng_state()
    image, target, view_id = views[(5, 2)]  # sample 5, epoch 2
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training loop's random stream is untouched
    assert view_id.tolist() == [5, 2] and target == int(data.train_set.labels[5])
    torch.manual_seed(123)  # whatever the global state, the same key gives the same view
    assert torch.equal(views[(5, 2)][0], image)
    epochs = torch.stack([views[(5, epoch)][0] for epoch in range(8)])
    assert len({tuple(e.flatten().tolist()) for e in epochs}) > 2  # the shift changes from epoch to epoch
    other_seed = SeededViews(data.train_set, seed=4)
    assert any(not torch.equal(views[(i, e)][0], other_seed[(i, e)][0]) for e in range(3) for i in range(5))
    batch = views.__getitems__([(5, 2), 7])  # a batch at once; a plain index is loaded unseeded (epoch -1)
    assert torch.equal(batch[0][0], image) and batch[1][2].tolist() == [7, -1]
    # A batch of plain indices (Lightning's sequential sampler for overfit_batches) draws from the global
    # generator as it stands, so the same sample gets a new random shift each time, not a frozen one.
    plain = torch.stack([views.__getitems__([5])[0][0] for _ in range(8)])
    assert len({tuple(p.flatten().tolist()) for p in plain}) > 2


@pytest.mark.parametrize("workers", [0, 2])
def test_views_the_student_trained_on_are_rebuilt_bit_identically(make_cfg, workers):
    cfg = make_cfg("seed=7", f"data.num_workers={workers}", "student.weights=none")
    data = build_data(cfg, cfg.student)
    arch = instantiate(cfg.student.arch)
    student = Classifier(arch.build(data.num_classes), arch.preprocessing())
    module = DistillationModule(student, instantiate(make_cfg("loss=ce").loss), optimizer_factory(cfg), None, 10)
    recorder = RecordBatches()
    trainer = L.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    L.seed_everything(7, verbose=False)  # the run's seed (PL_GLOBAL_SEED) decides the order and the views
    trainer.fit(module, datamodule=data)

    assert [epoch for epoch, *_ in recorder.batches] == [0, 0, 1, 1, 2, 2]
    rebuilt = SeededViews(data.train_set, seed=7)  # a fresh object, as a later process would build it
    for epoch, images, targets, view_ids in recorder.batches:
        assert (view_ids[:, 1] == epoch).all()
        for image, target, (index, view_epoch) in zip(images, targets, view_ids.tolist(), strict=True):
            view, view_target, _ = rebuilt[(index, view_epoch)]
            assert torch.equal(view, image) and view_target == target
    first_epoch = recorder.batches[0][3][:, 0].tolist()
    assert first_epoch != recorder.batches[2][3][:, 0].tolist()  # each epoch has its own order


@pytest.fixture
def image_folder(tmp_path):
    generator = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(3):
            pixels = generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    return tmp_path


def test_crop_flip_and_colour_jitter_views_are_rebuilt(image_folder):
    transform = T.Compose(
        [*train_view(24).transforms[:-1], T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.ToDtype(torch.float32)]
    )
    views = SeededViews(ImageFolder(str(image_folder), transform=transform), seed=0)
    check_reproducible(views)
    for key in [(0, 0), (4, 3), (5, 9)]:
        assert torch.equal(views[key][0], SeededViews(views.dataset, seed=0)[key][0])
    per_epoch = [views[(1, epoch)][0] for epoch in range(6)]
    assert len({tuple(v.flatten()[:64].tolist()) for v in per_epoch}) == 6  # new crop/flip/jitter each epoch
    assert "RandomResizedCrop" in views.describe() and "ColorJitter" in views.describe()


def test_a_transform_drawing_from_python_random_is_rebuilt_and_one_with_its_own_generator_refused(image_folder):
    def python_random_flip(image):  # Python's global random: seeded per view since timm's ops draw from it
        return T.functional.horizontal_flip(image) if random.random() < 0.5 else image

    transform = T.Compose([T.ToImage(), T.Lambda(python_random_flip), T.ToDtype(torch.float32, scale=True)])
    check_reproducible(SeededViews(ImageFolder(str(image_folder), transform=transform), seed=0), probes=6)

    own = random.Random()  # a generator of its own: nothing kd seeds reaches it

    def own_random_flip(image):
        return T.functional.horizontal_flip(image) if own.random() < 0.5 else image

    transform = T.Compose([T.ToImage(), T.Lambda(own_random_flip), T.ToDtype(torch.float32, scale=True)])
    views = SeededViews(ImageFolder(str(image_folder), transform=transform), seed=0)
    with pytest.raises(KdError, match="draws random numbers from a generator of its own"):
        check_reproducible(views, probes=6)
