"""Unlabeled images and label-scarce runs (kd.data.unlabeled): masks, mixing, sampling, cache, counts, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from timm.data import Mixup

from kd.data.digits import DigitsData
from kd.data.fake import FakeImageData
from kd.data.mixup import numpy_random_state
from kd.data.sampling import RatioSampler
from kd.data.unlabeled import UNLABELED, TrainingSet
from kd.errors import KdError
from kd.launch.run import user_error
from kd.losses.labels import hard_labels, label_cross_entropy
from kd.tasks.auto_weights import AutoWeights
from kd.tasks.common import build_data
from kd.tasks.models import build_teacher, cache_settings
from kd.tasks.train import fit
from kd.teachers.fill import open_teacher_cache
from tests.conftest import FAST

LOSSES = ["ce", "kd_ce", "dkd", "dist", "kd", "soft_ce", "dml"]
LABEL_FREE = ["kd", "soft_ce", "dml"]


def write_pictures(folder, count: int, size: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"part{i % 2}"  # recursive: no class folders, any depth
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")


LABEL_TERMS = {"ce": ["ce"], "kd_ce": ["ce"], "dkd": ["tckd", "nckd", "ce"], "dist": ["ce"]}


def terms_and_grad(loss, student, teacher, target) -> tuple[dict[str, float], torch.Tensor]:
    student = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(student, teacher, target), student)
    return {name: float(value) for name, value in loss.last_terms.items()}, grad


@pytest.mark.parametrize("loss_name", LOSSES)
def test_a_label_term_never_sees_the_label_of_an_unlabeled_image(make_cfg, loss_name):
    """Label terms of a batch with unlabeled rows (-1) equal those of its labeled rows alone, and give the
    unlabeled rows no gradient; label-free losses are the same whatever the labels are."""
    loss = instantiate(make_cfg(f"loss={loss_name}").loss)
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    unlabeled = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    masked = torch.where(unlabeled, UNLABELED, labels)
    terms, grad = terms_and_grad(loss, student, teacher, masked)
    assert all(np.isfinite(v) for v in terms.values())
    if loss_name in LABEL_FREE:
        for other in range(3):  # any label for the unlabeled rows: nothing changes
            leaked = torch.where(unlabeled, torch.full_like(labels, other), labels)
            assert terms_and_grad(loss, student, teacher, leaked)[0] == terms
        return
    alone, _ = terms_and_grad(loss, student[~unlabeled], teacher[~unlabeled], labels[~unlabeled])
    for name in LABEL_TERMS[loss_name]:
        assert terms[name] == pytest.approx(alone[name], rel=1e-5), name
    if loss_name == "ce":
        assert torch.all(grad[unlabeled] == 0) and torch.any(grad[~unlabeled] != 0)


@pytest.mark.parametrize("loss_name", ["ce", "kd_ce", "dkd", "dist"])
def test_an_all_unlabeled_batch_gives_a_zero_label_term(make_cfg, loss_name):
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    loss = instantiate(make_cfg(f"loss={loss_name}").loss)
    for target in (torch.full((4,), UNLABELED), torch.zeros(4, 10)):  # hard -1, or mixed rows of share 0
        value = loss(student.clone().requires_grad_(True), teacher, target)
        assert torch.isfinite(value)
        assert float(loss.last_terms.get("ce", torch.tensor(0.0))) == 0.0
        if loss_name == "dkd":
            assert float(loss.last_terms["tckd"]) == float(loss.last_terms["nckd"]) == 0.0


def test_a_mixed_label_counts_only_its_labeled_share():
    """Row [0.3 on class 2, 0.7 unknown] weighs 0.3 and trains towards class 2 alone; hard label: unknown."""
    logits = torch.randn(2, 5)
    target = torch.tensor([[0, 0, 0.3, 0, 0], [1.0, 0, 0, 0, 0]])
    log_p = logits.log_softmax(1)
    expected = -(0.3 * log_p[0, 2] + 1.0 * log_p[1, 0]) / 1.3
    assert float(label_cross_entropy(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    assert hard_labels(target).tolist() == [-1, 0]
    assert hard_labels(torch.tensor([[0, 0.6, 0, 0, 0]])).tolist() == [1]


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "mixup_cutmix"])
def test_mixing_neither_drops_nor_repeats_a_labeled_image(make_cfg, mode):
    """Each labeled image has its own class: over the mixed batch, each class's label mass is exactly 1 (the
    image is there once, in full) and the unknown mass equals the number of unlabeled images."""
    settings = make_cfg(f"mixup={mode}", "mixup.prob=1.0").mixup
    mixup = instantiate(settings)
    images = torch.rand(16, 3, 8, 8)
    target = torch.tensor([0, -1, 1, 2, -1, -1, 3, 4, 5, -1, 6, 7, -1, 8, 9, -1])
    for batch in range(6):
        mixed, soft = mixup(images, target, 10, (0, 0, batch))
        assert mixed.shape == images.shape and soft.shape == (16, 10)
        torch.testing.assert_close(soft.sum(0), torch.ones(10))  # every labeled image once, none dropped
        assert float(16 - soft.sum()) == pytest.approx(int((target < 0).sum()), abs=1e-5)
        assert (soft >= 0).all() and (soft.sum(1) <= 1 + 1e-6).all()


def test_mixup_of_a_fully_labeled_batch_is_unchanged_by_the_unknown_class(make_cfg):
    """The extra "no label" class changes nothing when every image has a label (timm's draws are the same)."""
    mixup = instantiate(make_cfg("mixup=mixup_cutmix").mixup)
    images, target = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    mixed, soft = mixup(images, target, 10, (0, 1, 2))
    with numpy_random_state(mixup.seed, 0, 1, 2):
        plain_images, plain_soft = Mixup(**mixup.settings, label_smoothing=0.0, num_classes=10)(images.clone(), target)
    assert torch.equal(mixed, plain_images) and torch.equal(soft, plain_soft)


def scarce(**options) -> DigitsData:
    data = DigitsData(batch_size=32, labeled_fraction=0.1, **options)
    data.setup("fit")
    return data


def test_a_labeled_fraction_is_stratified_seeded_and_hides_the_rest():
    data = scarce()
    assert isinstance(data.train_set, TrainingSet)
    assert (data.num_labeled, data.num_unlabeled) == (145, 1292)
    labeled = [int(data.train_set[i][1]) for i in range(data.num_labeled)]
    assert np.bincount(labeled).min() >= 14  # every class keeps ~10% of its ~144 images
    assert all(data.train_set[i][1] == UNLABELED for i in range(data.num_labeled, len(data.train_set)))
    assert data.train_set.labeled.indices == scarce().train_set.labeled.indices  # fixed by split_seed
    assert data.train_set.labeled.indices != scarce(split_seed=1).train_set.labeled.indices
    only = data.labeled_only()
    assert len(only.train_set) == 145 and only.num_unlabeled == 0


def test_changing_the_hidden_labels_changes_no_training_batch():
    """The hidden labels of the unlabeled part never reach a batch: scrambling them changes nothing."""
    first, second = scarce(), scarce()
    base = second.train_set.unlabeled[0].dataset
    hidden = second.train_set.unlabeled[0].indices
    base.labels[hidden] = (base.labels[hidden] + 3) % 10
    for a, b in zip(first.training_loader(1, 0, seed=0), second.training_loader(1, 0, seed=0), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_an_unlabeled_folder_joins_any_data_module_with_the_training_transform(tmp_path):
    write_pictures(tmp_path / "pictures", 6)
    data = DigitsData(batch_size=4, unlabeled=str(tmp_path / "pictures"))
    data.setup("fit")
    assert (data.num_labeled, data.num_unlabeled) == (1437, 6)
    image, target = data.train_set[1437]
    assert target == UNLABELED and image.shape == (1, 8, 8) and 0 <= float(image.min()) <= float(image.max()) <= 1
    fake = FakeImageData(num_classes=4, image_size=16, train_size=8, unlabeled=str(tmp_path / "pictures"))
    fake.setup("fit")
    assert fake.train_set[8][0].shape == (3, 16, 16) and fake.num_unlabeled == 6


def keys_of(sampler) -> list[tuple[int, int]]:
    return list(iter(sampler))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_a_ratio_sampler_composes_batches_and_resumes_exactly(ratio):
    data = scarce(unlabeled_ratio=ratio)
    batch, per_batch = data.batch_size, data.unlabeled_per_batch
    for world in (1, 2):
        labeled_seen = []
        for rank in range(world):
            keys = keys_of(data.ratio_sampler(world, rank, seed=3, start_epoch=2))
            assert len(keys) % batch == 0 and {e for _, e in keys} == {2}
            chunks = [keys[i : i + batch] for i in range(0, len(keys), batch)]
            for chunk in chunks[:-1]:  # every batch but the last holds exactly per_batch unlabeled images
                assert sum(i >= data.num_labeled for i, _ in chunk) == per_batch
            labeled_seen += [i for i, _ in keys if i < data.num_labeled]
            # resumed after 3 batches: the rest of the same epoch, key for key
            resumed = keys_of(data.ratio_sampler(world, rank, seed=3, start_epoch=2, skip=3 * batch))
            assert resumed == keys[3 * batch :]
        if ratio < 1.0:  # each labeled image once per epoch (plus the padding of an uneven split over ranks)
            counts = np.bincount(labeled_seen, minlength=data.num_labeled)
            assert counts.min() == 1 and counts.sum() - data.num_labeled < world
        else:
            assert labeled_seen == []
    again = keys_of(data.ratio_sampler(1, 0, seed=3, start_epoch=2))
    assert again == keys_of(data.ratio_sampler(1, 0, seed=3, start_epoch=2))
    assert again != keys_of(data.ratio_sampler(1, 0, seed=3, start_epoch=3))


def test_the_unlabeled_stream_uses_every_unlabeled_image_equally_often():
    data = scarce(unlabeled_ratio=0.25)
    sampler = data.ratio_sampler(1, 0, seed=0)
    used = []
    for epoch in range(12):
        sampler.set_epoch(epoch)
        used += [i for i, _ in iter(sampler) if i >= data.num_labeled]
    counts = np.bincount(np.array(used) - data.num_labeled, minlength=data.num_unlabeled)
    assert counts.max() - counts.min() <= 1


def test_a_ratio_run_resumes_the_loader_mid_epoch_exactly():
    """The data module's own loader, resumed from a batch position, gives the same images, labels and views."""
    data = scarce(unlabeled_ratio=0.5)
    full = list(data.training_loader(1, 0, seed=0, start_epoch=1))
    resumed = list(data.training_loader(1, 0, seed=0, start_epoch=1, skip=2 * data.batch_size))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert isinstance(full and data.training_loader(1, 0, 0).sampler, RatioSampler)


@pytest.mark.parametrize("mixup", [None, "mixup"])
def test_the_teacher_cache_holds_the_teachers_outputs_for_unlabeled_views(make_cfg, tmp_path, mixup):
    overrides = [*FAST, "data.labeled_fraction=0.5", "data.batch_size=32", f"teacher.cache={tmp_path / 'c'}"]
    if mixup:
        overrides += [f"mixup={mixup}"]
    cfg = make_cfg(*overrides)
    data = build_data(cfg, cfg.student)
    teacher = build_teacher(cfg, data.num_classes, AutoWeights(cfg.paths.cache_dir, cfg.data, data))
    mixer = instantiate(cfg.mixup) if mixup else None
    store, written = open_teacher_cache(cache_settings(cfg), teacher, data, 1, mixer)
    assert written == [0]
    unlabeled_looked_up = 0
    for batch_idx, (images, target, view_ids) in enumerate(data.training_loader(1, 0, seed=int(cfg.seed))):
        if mixer is not None:
            images, _ = mixer(images, target, data.num_classes, (0, 0, batch_idx))
        with torch.no_grad():
            exact = teacher(images)
        torch.testing.assert_close(store.lookup(view_ids), exact, rtol=0, atol=2e-2)
        unlabeled_looked_up += int((target == UNLABELED).sum())
    assert unlabeled_looked_up > 500
    other = make_cfg(*[o.replace("0.5", "0.25") for o in overrides])
    other_data = build_data(other, other.student)
    other_store, _ = open_teacher_cache(cache_settings(other), teacher, other_data, 1, mixer)
    assert other_store.folder != store.folder  # the fraction is part of the cache key


def test_weights_auto_key_changes_with_the_fraction_and_not_with_the_unlabeled_folder(make_cfg, tmp_path):
    write_pictures(tmp_path / "pictures", 2)
    paths = {}
    for name, extra in {
        "all": [],
        "tenth": ["data.labeled_fraction=0.1"],
        "tenth+folder": ["data.labeled_fraction=0.1", f"data.unlabeled={tmp_path / 'pictures'}"],
    }.items():
        cfg = make_cfg(*extra)
        data = build_data(cfg, cfg.student)
        paths[name] = AutoWeights(cfg.paths.cache_dir, cfg.data, data).path_for(cfg.teacher)
    assert paths["all"] != paths["tenth"] == paths["tenth+folder"]


@pytest.mark.slow
def test_results_record_the_counts_and_train_uses_the_labeled_part_alone(make_cfg, tmp_path):
    """Also: pretraining and task=train see the labeled images alone (145 of them, so 2 batches of 64)."""
    scarce_run = [*FAST, "data.labeled_fraction=0.1", "logger=[csv]"]
    distilled = fit(make_cfg(*scarce_run, f"paths.output_dir={tmp_path / 'd'}"), task="distill")
    assert distilled["train_images"] == {"labeled": 145, "unlabeled": 1292}
    saved = json.loads((tmp_path / "d" / "results.json").read_text())
    assert saved["train_images"] == {"labeled": 145, "unlabeled": 1292}
    trained = fit(make_cfg(*scarce_run, "task=train", f"paths.output_dir={tmp_path / 't'}"), task="train")
    assert trained["train_images"] == {"labeled": 145, "unlabeled": 0}
    steps = [line for line in (tmp_path / "t" / "csv" / "metrics.csv").read_text().splitlines() if ",," in line]
    assert steps  # the run trained
    assert json.loads((tmp_path / "t" / "results.json").read_text())["train_images"]["unlabeled"] == 0


def refused(make_cfg, *overrides, task="distill") -> str:
    with pytest.raises(Exception) as error:  # hydra's instantiate wraps a constructor's KdError
        fit(make_cfg(*FAST, *overrides), task=task)
    kd_error = user_error(error.value)
    assert kd_error is not None, error.value
    message = str(kd_error)
    assert not re.search(r"[.;]\s+[A-Z]", message) and len(message) < 300, message  # one sentence
    return message


def test_bad_input_is_refused_in_one_sentence(make_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no image")
    assert "is not a folder" in refused(make_cfg, f"data.unlabeled={tmp_path / 'missing'}")
    assert "no readable image" in refused(make_cfg, f"data.unlabeled={tmp_path / 'empty'}")
    assert "readme.txt" in refused(make_cfg, f"data.unlabeled={tmp_path / 'notes'}")  # bad_images=stop names it
    for fraction in (0, 1.5, -0.1):
        assert "(0, 1]" in refused(make_cfg, f"data.labeled_fraction={fraction}")
    assert "without a labeled image" in refused(make_cfg, "data.labeled_fraction=0.001")
    assert "unlabeled images only" in refused(make_cfg, "loss=ce", "data.labeled_fraction=0.5",
                                              "data.unlabeled_ratio=1.0")  # fmt: skip
    assert "needs unlabeled images" in refused(make_cfg, "data.unlabeled_ratio=0.5")
    assert "(0, 1]" in refused(make_cfg, "data.labeled_fraction=0.5", "data.unlabeled_ratio=1.5")
    assert "at least one image of each kind" in refused(make_cfg, "data.labeled_fraction=0.5",
                                                        "data.unlabeled_ratio=0.001")  # fmt: skip


def test_unreadable_unlabeled_images_follow_bad_images(tmp_path):
    write_pictures(tmp_path / "pictures", 3)
    (tmp_path / "pictures" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "pictures" / ".hidden.png").write_bytes(b"ignored: hidden")
    with pytest.raises(KdError, match="broken.png"):
        DigitsData(unlabeled=str(tmp_path / "pictures")).setup("fit")
    data = DigitsData(unlabeled=str(tmp_path / "pictures"), bad_images="skip")
    data.setup("fit")
    assert data.num_unlabeled == 3
    truncated = tmp_path / "pictures" / "part0" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:20])  # passes the header check, fails to decode
    data = DigitsData(unlabeled=str(tmp_path / "pictures"), bad_images="skip")
    data.setup("fit")
    image, target = data.train_set[data.num_labeled]  # served the next image instead
    assert target == UNLABELED and image.shape == (1, 8, 8)


def test_the_batch_check_lets_unlabeled_images_through_and_still_refuses_bad_labels():
    from kd.data.batches import unpack_batch

    images = torch.rand(4, 1, 8, 8)
    labels = torch.tensor([3, UNLABELED, 9, UNLABELED])
    _, target, _ = unpack_batch((images, labels), 1, 10, True)
    assert torch.equal(target, labels)  # -1 reaches the masked label terms unchanged
    for bad in (torch.tensor([3, -2, 0, 1]), torch.tensor([3, 10, 0, 1])):
        with pytest.raises(KdError, match="outside the 10 classes"):
            unpack_batch((images, bad), 1, 10, True)
