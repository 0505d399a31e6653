"""kd's FakeData draws torchvision's images without touching the global generator or PIL."""

import torch
from torchvision.datasets import FakeData

from kd.data.fake import FakeImageData


def test_fake_images_equal_torchvisions_and_leave_the_global_generator_alone():
    data = FakeImageData(num_classes=7, image_size=12, train_size=40, val_size=5)
    data.setup()
    for ours in (data.train_set, data.val_set):
        theirs = FakeData(len(ours), ours.image_size, 7, ours.transform, random_offset=ours.random_offset)
        for index in range(len(ours)):
            torch.manual_seed(123)
            image, label = ours[index]
            assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())  # not drawn from
            expected_image, expected_label = theirs[index]
            assert torch.equal(image, expected_image) and image.dtype == torch.float32
            assert label == expected_label and isinstance(label, int)
