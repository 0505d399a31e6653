"""The two Baidu recipes compose (ImageNet itself is not here) with the figures their files document."""

import numpy as np
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


@pytest.mark.parametrize("epochs, published", [(300, None), (1200, None), (9600, 82.8)])
def test_function_matching_recipe(make_cfg, epochs, published):
    """big_vision configs/proj/distill/bit_i1k.py's settings; the schedule length is one override."""
    cfg = make_cfg("experiment=function_matching", "data.root=/data/imagenet", f"trainer.max_epochs={epochs}")
    chosen = choices(cfg)
    picked = (chosen["data"], chosen["loss"], chosen["optim"], chosen["mixup"])
    assert picked == ("imagenet", "function_matching", "adamw", "mixup")
    assert cfg.teacher.arch.model_name == "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"
    assert cfg.student.arch.model_name == "resnetv2_50x1_bit" and cfg.student.weights == "none"
    assert cfg.teacher.view == "consistent" and cfg.published.top1 == published
    assert (cfg.data.image_size, list(cfg.data.scale), list(cfg.data.ratio)) == (224, [0.05, 1.0], [0.75, 1.33])
    assert (cfg.mixup.mixup_alpha, cfg.mixup.prob, cfg.mixup.cutmix_alpha) == (1.0, 1.0, 0.0)
    loss = instantiate(cfg.loss)
    assert (loss.temperature, loss.alpha) == (1.0, 0.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, list(cfg.optim.betas)) == (0.03, 3e-4, [0.9, 0.999])
    assert optimizer_factory(cfg).lr_for(4096) == pytest.approx(0.03)
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_epochs, cfg.sched.warmup_epochs) == (1.0, epochs, 16.3)


# Two steps on fake data: the recipe's whole pipeline (strong views, mixup, the teacher's view, the loss).
FAKE_TWO_STEPS = [
    "data=fake",
    "data.num_classes=10",
    "data.train_size=16",
    "data.val_size=8",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "sched.warmup_epochs=0",
    "logger=csv",
    "student.measure_speed=false",
]


@pytest.mark.parametrize(
    "recipe",
    [
        # The ImageNet recipe's settings on fake 32 px images, with small timm models and no download.
        [
            "experiment=function_matching",
            "teacher.model=resnetv2_50x1_bit",
            "teacher.weights=none",
            "student.model=resnet10t",
            "data.image_size=32",
            "~data.interpolation",  # image-folder settings fake data does not take
            "~data.crop_pct",
            "data.auto_augment=rand-m9-mstd0.5-inc1",
            "data.re_prob=0.25",
        ],
        # The digits recipe's settings with 3-channel models for the fake RGB images, the teacher on its own view.
        [
            "experiment=digits_function_matching",
            "teacher=resnet8",
            "student=resnet8",
            "teacher.weights=none",
            "student.weights=none",
            "data.image_size=8",
            "teacher.view=independent",
        ],
    ],
)
def test_function_matching_recipes_train_two_steps_on_fake_data(make_cfg, tmp_path, recipe):
    from kd.tasks.train import fit

    results = fit(make_cfg(*recipe, *FAKE_TWO_STEPS), task="distill")
    assert results["history"][-1]["step"] == 2 and np.isfinite(results["metrics"]["student/top1"])
