"""The CIFAR-100 recipes (experiment=cifar100_<method>[_wrn]) compose with the authors' published settings,
refuse to start without a teacher file, and train two steps (on fake 32 px images of 100 classes)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from kd.errors import KdError
from kd.losses import DecoupledKD, FitNet, HintonKD, LabelCrossEntropy
from kd.tasks.records import choices
from kd.tasks.train import fit
from tests.conftest import assert_only_hydra_files

PAIRS = {"": ("resnet32x4", "resnet8x4"), "_wrn": ("wrn_40_2", "wrn_16_2")}
METHODS = ("ce", "kd", "dkd", "fitnet", "at", "sp", "pkt", "rkd", "crd", "reviewkd")
RECIPES = [f"cifar100_{method}{suffix}" for suffix in PAIRS for method in METHODS]
# The authors' top-1 (%): CRD Table 1 (RepDistiller README) for teacher, student, KD and FitNet; the DKD
# paper (mdistiller README) for DKD. (teacher, student, method)
PUBLISHED = {
    "cifar100_ce": (79.42, 72.50, 72.50),
    "cifar100_kd": (79.42, 72.50, 73.33),
    "cifar100_dkd": (79.42, 72.50, 76.32),
    "cifar100_fitnet": (79.42, 72.50, 73.50),
    "cifar100_ce_wrn": (75.61, 73.26, 73.26),
    "cifar100_kd_wrn": (75.61, 73.26, 74.92),
    "cifar100_dkd_wrn": (75.61, 73.26, 76.23),
    "cifar100_fitnet_wrn": (75.61, 73.26, 73.58),
    # CRD Table 1 (RepDistiller README) for AT, SP, PKT, RKD and CRD; the ReviewKD paper (mdistiller README).
    "cifar100_at": (79.42, 72.50, 73.44),
    "cifar100_sp": (79.42, 72.50, 72.94),
    "cifar100_pkt": (79.42, 72.50, 73.64),
    "cifar100_rkd": (79.42, 72.50, 71.90),
    "cifar100_crd": (79.42, 72.50, 75.51),
    "cifar100_reviewkd": (79.42, 72.50, 75.63),
    "cifar100_at_wrn": (75.61, 73.26, 74.08),
    "cifar100_sp_wrn": (75.61, 73.26, 73.83),
    "cifar100_pkt_wrn": (75.61, 73.26, 74.54),
    "cifar100_rkd_wrn": (75.61, 73.26, 73.35),
    "cifar100_crd_wrn": (75.61, 73.26, 75.48),
    "cifar100_reviewkd_wrn": (75.61, 73.26, 76.12),
}
# The loss settings each recipe must carry (mdistiller engine/cfg.py, RepDistiller's run_cifar_distill.sh).
FEATURE_SETTINGS = {
    "at": {"beta": 1000.0, "p": 2.0, "ce_weight": 1.0},
    "sp": {"gamma": 3000.0, "ce_weight": 1.0},
    "pkt": {"weight": 30000.0, "ce_weight": 1.0},
    "rkd": {"distance_weight": 25.0, "angle_weight": 50.0, "ce_weight": 1.0},
    "crd": {
        "weight": 0.8,
        "feat_dim": 128,
        "num_negatives": 16384,
        "nce_t": 0.07,
        "nce_momentum": 0.5,
        "ce_weight": 1.0,
    },
    "reviewkd": {"review_weight": 1.0, "warmup_epochs": 20, "max_mid_channels": 512, "ce_weight": 1.0},
}
# Two steps on fake data: one batch per epoch, two epochs, the LR drop inside the run.
SMOKE = [
    "data=fake",
    "data.num_classes=100",
    "data.image_size=32",
    "data.train_size=16",
    "data.val_size=8",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=1",
    "sched.milestones=[1]",
    "logger=[csv]",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_with_the_published_settings(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", "data.root=/data/cifar")
    chosen = choices(cfg)
    method, pair = name.removeprefix("cifar100_").split("_")[0], "_wrn" if name.endswith("_wrn") else ""
    teacher, student = PAIRS[pair]
    assert (chosen["data"], chosen["teacher"], chosen["student"]) == ("cifar100", teacher, student)
    assert (chosen["optim"], chosen["sched"]) == ("sgd", "multistep")
    assert chosen["task"] == ("train" if method == "ce" else "distill")
    assert cfg.data.classes == 100 and cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 240
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov) == (0.05, 0.9, 5e-4, False)
    assert cfg.optim.lr_batch_size is None  # 0.05 at batch 64, as published, not rescaled
    assert list(cfg.sched.milestones) == [150, 180, 210] and cfg.sched.gamma == 0.1
    assert cfg.sched.warmup_epochs == 0 and cfg.sched.per_step is False  # both scripts set the LR once per epoch
    assert cfg.student.weights == "none"
    loss = instantiate(cfg.loss)
    if method == "ce":
        assert isinstance(loss, LabelCrossEntropy) and loss.label_smoothing == 0
    else:
        assert cfg.teacher.weights == "required"  # the user gives the trained teacher
    if method == "kd":  # mdistiller: CE_WEIGHT 0.1, KD_WEIGHT 0.9, TEMPERATURE 4
        assert isinstance(loss, HintonKD) and (loss.alpha, loss.temperature) == (0.1, 4.0)
    if method == "dkd":  # mdistiller: CE 1, ALPHA 1, BETA 8 (6 for wrn_40_2 -> wrn_16_2), T 4, WARMUP 20
        assert isinstance(loss, DecoupledKD)
        assert (loss.ce_weight, loss.alpha, loss.temperature, loss.warmup_epochs) == (1.0, 1.0, 4.0, 20)
        assert loss.beta == (6.0 if pair == "_wrn" else 8.0)
    if method == "fitnet":  # mdistiller: HINT_LAYER 2, CE_WEIGHT 1, FEAT_WEIGHT 100
        assert isinstance(loss, FitNet)
        assert (loss.student_stage, loss.teacher_stage, loss.hint_weight, loss.ce_weight) == (2, 2, 100.0, 1.0)
    for key, value in FEATURE_SETTINGS.get(method, {}).items():
        assert cfg.loss[key] == value, (name, key)
    published = cfg.published
    assert (published.teacher_top1, published.student_top1, published.top1) == PUBLISHED[name]
    assert "Table 1" in published.source
    assert cfg.loss._target_.endswith(type(loss).__name__)


@pytest.mark.parametrize("name", ["cifar100_kd", "cifar100_fitnet_wrn"])
def test_recipe_without_a_teacher_file_stops_before_any_work(make_cfg, tmp_path, name):
    with pytest.raises(KdError) as raised:
        fit(make_cfg(f"experiment={name}", *SMOKE), task="distill")
    message = str(raised.value)
    assert message.startswith("teacher.weights is not set, and this recipe needs the teacher's trained weights")
    assert "teacher.weights=FILE" in message and "\n" not in message and len(message) < 300
    assert_only_hydra_files(tmp_path / "out")


# Each takes 20-80 s on a loaded 2-core machine; the two wrn ones (labels, features) stay in the fast suite.
FAST_SMOKE = ("cifar100_ce_wrn", "cifar100_fitnet_wrn", "cifar100_crd")


@pytest.mark.parametrize(
    "name", [name if name in FAST_SMOKE else pytest.param(name, marks=pytest.mark.slow) for name in RECIPES]
)
def test_recipe_trains_two_steps_on_fake_cifar(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", *SMOKE, "teacher.weights=none")
    results = fit(cfg, task="train" if name.startswith("cifar100_ce") else "distill")
    assert results["history"][-1]["step"] == 2
    assert 0 <= results["metrics"]["student/top1"] <= 1
