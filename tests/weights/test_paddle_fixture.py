"""kd's PaddleClas mapping against a file real PaddlePaddle wrote, with no PaddlePaddle in CI.

tests/weights/test_paddle.py checks the mapping on files written by tests/paddle_export.py, kd's own inverse of it, so a
wrong idea of PaddleClas's layout would pass there. Here the weights and the logits come from PaddleClas's own
ResNet50_vd and ``paddle.save`` (tests/fixtures/make_paddle_fixture.py, run once with PaddlePaddle installed).
"""

from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kd.launch.configs import CONF_DIR
from kd.tasks.models import build_teacher_model
from kd.weights.paddle import PADDLECLAS_PREPROCESSING
from tests.conftest import ROOT

DATA = ROOT / "tests" / "fixtures"
# PaddleClas's ImageNet normalization, as the generator applied it before its forward.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# The weights are float16-exact, so both sides compute in float32 on the same values: only the order of the
# sums differs (Paddle's and PyTorch's CPU convolutions). Through 50 layers that moved logits of up to 11 by
# 1.8e-5 when measured; 1e-3 leaves room for other CPUs' kernels, and a wrong mapping moves them by whole units.
ATOL = 1e-3


@pytest.fixture(scope="module")
def paddleclas_resnet50_vd(tmp_path_factory) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    path = tmp_path_factory.mktemp("paddle") / "ResNet50_vd.pdparams"
    path.write_bytes(lzma.decompress((DATA / "paddleclas_resnet50_vd.pdparams.xz").read_bytes()))
    reference = np.load(DATA / "paddleclas_resnet50_vd_logits.npz")
    cfg = OmegaConf.load(CONF_DIR / "model" / "resnet50_vd.yaml")
    cfg.name, cfg.weights = "resnet50_vd", str(path)
    model = build_teacher_model(cfg, int(reference["logits"].shape[1])).eval()
    return model, reference["images"], reference["logits"]


def test_paddleclas_written_resnet50_vd_gives_paddleclas_logits_through_kd(paddleclas_resnet50_vd):
    model, images, expected = paddleclas_resnet50_vd
    images, expected = torch.from_numpy(images), torch.from_numpy(expected)
    assert expected.abs().max() > 1  # the logits carry signal
    assert (expected[0] - expected[1]).abs().max() > 0.1  # and depend on the image
    with torch.inference_mode():
        logits = model.net(((images - MEAN) / STD).float())  # the same normalized tensor PaddleClas saw
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)


def test_paddleclas_written_file_gets_paddleclas_normalization(paddleclas_resnet50_vd):
    model, images, expected = paddleclas_resnet50_vd
    assert model.preprocessing == PADDLECLAS_PREPROCESSING
    with torch.inference_mode():
        logits = model(torch.from_numpy(images))  # kd normalizes the [0, 1] images itself
    torch.testing.assert_close(logits, torch.from_numpy(expected), rtol=0, atol=ATOL)
