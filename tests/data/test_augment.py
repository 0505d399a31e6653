"""Strong augmentation (timm's ops) inside kd's seeded views, and the teacher's view of each image (teacher.view)."""

import random

import numpy as np
import pytest
import torch

from kd.data.augment import Augment, StrongTensorView
from kd.data.digits import DigitsData
from kd.data.fake import FakeImageData
from kd.data.sampling import SeededViews, check_reproducible
from kd.errors import KdError

STRONG = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}


def digits(**settings) -> DigitsData:
    data = DigitsData(**settings)
    data.setup("fit")
    return data


def test_strong_views_are_rebuilt_from_seed_epoch_and_sample_and_leave_every_generator_alone():
    data = digits(**STRONG)
    views = SeededViews(data.train_set, seed=5)
    check_reproducible(views, probes=8)  # every global generator disturbed between two builds of a view
    before = random.random(), np.random.rand(), torch.rand(1)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    keys = [(index, epoch) for index in range(16) for epoch in (0, 3)]
    first = views.__getitems__(keys)
    after = random.random(), np.random.rand(), torch.rand(1)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert (random.random(), np.random.rand(), torch.rand(1)) == after  # the views drew from none of them
    assert before != after
    again = SeededViews(data.train_set, seed=5).__getitems__(list(reversed(keys)))[::-1]  # another order, object
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    other_seed = SeededViews(data.train_set, seed=6).__getitems__(keys)
    assert sum(not torch.equal(a[0], b[0]) for a, b in zip(first, other_seed, strict=True)) > len(keys) // 2


def test_auto_augment_and_erasing_change_the_views_beyond_the_plain_shift():
    plain, strong = SeededViews(digits().train_set, 0), SeededViews(digits(**STRONG).train_set, 0)
    keys = [(index, 1) for index in range(64)]
    changed = [
        not torch.equal(a[0], b[0]) for a, b in zip(plain.__getitems__(keys), strong.__getitems__(keys), strict=True)
    ]
    assert sum(changed) > 48  # RandAugment's 2 ops at p 0.5 leave about 1 image in 4 as the shift made it
    erased = digits(re_prob=1.0, re_mode="const")  # every image gets a box of zeros, nothing else changes
    shifted = [SeededViews(digits().train_set, 0)[key][0] for key in keys]
    boxes = [SeededViews(erased.train_set, 0)[key][0] for key in keys]
    # The strong path works on 8-bit images (PIL, as timm's ops need): the digit's 17 grey levels come back to 1/255.
    assert all((((b - s).abs() <= 1 / 255) | (b == 0)).all() for b, s in zip(boxes, shifted, strict=True))
    assert sum(bool(((b - s).abs() > 1 / 255).any()) for b, s in zip(boxes, shifted, strict=True)) > 32


@pytest.mark.parametrize("name", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "trivialaugment", "original", "v0"])
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_every_kind_of_auto_augment_works_on_digits_and_rgb_images(name, channels, size):
    view = StrongTensorView(Augment(auto_augment=name, re_prob=0.5), size, channels)
    images = torch.rand(24, channels, size, size)
    for image in images:
        out = view(image)
        assert out.shape == (channels, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert "RandomErasing" in repr(view)


def test_scale_and_ratio_make_a_random_resized_crop_of_the_digit():
    cropped = SeededViews(digits(scale=[0.3, 0.5], ratio=[0.5, 2.0], max_shift=0).train_set, 0)
    plain = SeededViews(digits(max_shift=0).train_set, 0)
    keys = [(index, 0) for index in range(16)]
    pairs = zip(cropped.__getitems__(keys), plain.__getitems__(keys), strict=True)
    assert all(not torch.equal(a[0], b[0]) for a, b in pairs)
    assert "RandomResizedCrop" in repr(cropped.dataset) and "scale=(0.3, 0.5)" in repr(cropped.dataset)


def test_the_fixed_teacher_view_is_the_unaugmented_image_in_every_epoch():
    data = digits(**STRONG)
    views = SeededViews(data.train_set, 0, teacher_view="fixed")
    for index in (0, 7, 300):
        epochs = [views[(index, epoch)] for epoch in range(4)]
        assert all(torch.equal(sample[3], data.train_set.images[index]) for sample in epochs)
        assert len({tuple(sample[0].flatten().tolist()) for sample in epochs}) > 1  # the student's view moves
    check_reproducible(views)


def test_the_independent_teacher_view_is_its_own_seeded_view_of_the_same_image():
    data = digits(**STRONG)
    views = SeededViews(data.train_set, 0, teacher_view="independent")
    consistent = SeededViews(data.train_set, 0)
    keys = [(index, epoch) for index in range(32) for epoch in (0, 2)]
    samples = views.__getitems__(keys)
    assert all(torch.equal(s[0], c[0]) for s, c in zip(samples, consistent.__getitems__(keys), strict=True))
    assert sum(not torch.equal(s[0], s[3]) for s in samples) > len(keys) * 3 // 4  # not the student's view
    rebuilt = SeededViews(data.train_set, 0, teacher_view="independent").__getitems__(keys)  # reproducible
    assert all(torch.equal(s[3], r[3]) for s, r in zip(samples, rebuilt, strict=True))
    other = SeededViews(data.train_set, 1, teacher_view="independent").__getitems__(keys)
    assert sum(not torch.equal(s[3], o[3]) for s, o in zip(samples, other, strict=True)) > len(keys) // 2
    check_reproducible(views)


def test_fake_data_takes_the_same_settings():
    data = FakeImageData(num_classes=10, image_size=32, train_size=8, **STRONG, color_jitter=0.4)
    data.setup("fit")
    plain = FakeImageData(num_classes=10, image_size=32, train_size=8)
    plain.setup("fit")
    views = SeededViews(data.train_set, 0, "fixed")
    samples = [views[(3, epoch)] for epoch in range(4)]
    assert all(torch.equal(sample[3], plain.train_set[3][0]) for sample in samples)  # the image, un-augmented
    assert sum(not torch.equal(sample[0], sample[3]) for sample in samples) >= 2  # the student's, augmented
    check_reproducible(views)


def test_pretraining_uses_the_plain_views():
    data = digits(**STRONG)
    plain = data.plain_views()
    assert plain is not data and plain.augment == Augment() and data.augment.auto_augment == STRONG["auto_augment"]
    assert plain.train_set.strong is None and data.train_set.strong is not None
    assert digits().plain_views() is not None


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"auto_augment": "rand-x9"}, "data.auto_augment=rand-x9 is not a timm auto-augment string"),
        ({"auto_augment": "randaugment"}, "data.auto_augment=randaugment is not a timm auto-augment string"),
        ({"auto_augment": "autoaug"}, "data.auto_augment=autoaug is not a timm auto-augment string"),
        ({"re_prob": 1.5}, "data.re_prob=1.5 must lie in [0, 1]"),
        ({"re_prob": -0.1}, "data.re_prob=-0.1 must lie in [0, 1]"),
        ({"re_mode": "noise"}, "data.re_mode=noise is not one of const, rand, pixel"),
        ({"re_count": 0}, "data.re_count=0 must be a whole number of at least 1"),
        ({"color_jitter": [0.4, 0.4]}, "data.color_jitter=[0.4, 0.4] must be one number >= 0, or 3"),
        ({"scale": [0.9, 0.1]}, "data.scale=[0.9, 0.1] must be [min, max] with min <= max, both (0.0, 1.0]"),
        ({"scale": [0.5, 1.5]}, "data.scale=[0.5, 1.5] must be [min, max]"),
        ({"scale": [0.5]}, "data.scale=[0.5] must be two numbers [min, max]"),
        ({"ratio": [0, 1]}, "data.ratio=[0, 1] must be [min, max] with min <= max, both above 0.0"),
    ],
)
def test_bad_augmentation_settings_are_refused_in_one_sentence(settings, expected):
    with pytest.raises(KdError) as refused:
        DigitsData(**settings)
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)
    assert len(str(refused.value)) < 300


def test_a_bad_teacher_view_is_refused():
    with pytest.raises(KdError, match="teacher.view=same is not one of consistent, fixed, independent"):
        SeededViews(digits().train_set, 0, teacher_view="same")
