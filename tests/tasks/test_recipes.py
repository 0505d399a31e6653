"""The two Baidu recipes compose (ImageNet itself is not here) with the figures their files document."""

import pytest
from hydra.utils import instantiate

from kd.losses import SoftTargetCrossEntropy, SymmetricKL
from kd.tasks.common import optimizer_factory
from kd.tasks.records import choices


def test_resnet50_vd_baidu_recipe(make_cfg):
    cfg = make_cfg("experiment=resnet50_vd_baidu", "data.root=/data/imagenet")
    chosen = choices(cfg)
    assert {k: chosen[k] for k in ("data", "teacher", "student", "loss", "optim", "sched")} == {
        "data": "imagenet",
        "teacher": "resnet152_vd",
        "student": "resnet50_vd",
        "loss": "soft_ce",
        "optim": "sgd",
        "sched": "warmup_cosine",
    }
    assert cfg.student.weights == "pretrained" and not cfg.teacher.bn_train_mode
    assert isinstance(instantiate(cfg.loss), SoftTargetCrossEntropy)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.sched.warmup_epochs) == (0.9, 1e-4, 5)
    assert (cfg.trainer.max_epochs, cfg.data.image_size, cfg.data.crop_pct) == (100, 224, 0.875)
    recipe = optimizer_factory(cfg)
    assert recipe.lr_for(256) == pytest.approx(0.1) and recipe.lr_for(2048) == pytest.approx(0.8)
    assert recipe.lr_for(cfg.data.batch_size * 4) == pytest.approx(0.1)  # 64 per device on 4 devices


def test_resnet50_vd_ssld_recipe(make_cfg):
    cfg = make_cfg("experiment=resnet50_vd_ssld", "data.root=/data/imagenet")
    chosen = choices(cfg)
    assert (chosen["teacher"], chosen["student"], chosen["loss"]) == ("resnext101_32x16d_wsl", "resnet50_vd", "dml")
    assert cfg.teacher.arch.model_name == "resnext101_32x16d" and cfg.teacher.bn_train_mode
    assert cfg.student.weights == "none"
    assert isinstance(instantiate(cfg.loss), SymmetricKL)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.sched.warmup_epochs) == (0.9, 7e-5, 5)
    assert cfg.trainer.max_epochs == 120
    recipe = optimizer_factory(cfg)
    assert recipe.lr_for(1024) == pytest.approx(0.4) and recipe.lr_for(256) == pytest.approx(0.1)


def test_digits_kd_is_the_default(make_cfg):
    default, spelled_out = make_cfg(), make_cfg("experiment=digits_kd")
    for key in ("data", "teacher", "student", "loss", "optim", "sched", "trainer"):
        assert default[key] == spelled_out[key], key
