"""The model zoo: every conf/model yaml builds, runs, counts its parameters right and normalizes for itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.launch.configs import CONF_DIR, register_models
from kd.tasks.models import build_student, build_teacher_model
from kd.zoo import describe, model_names, table
from tests.conftest import ROOT

# Stems with several unpadded strided convolutions need more than 32 px to leave a feature map.
SMALLEST_INPUT = {"alexnet": 64, "inception_v4": 75, "inception_resnet_v2": 75}

SEED_ARTICLE_MODELS = [
    "alexnet",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "googlenet",
    "inception_v4",
    "inception_resnet_v2",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "shufflenet_v2_x1_0",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50_vc",
    "resnet50_vd",
    "resnet101_vd",
    "resnet152_vd",
    "resnet200_vd",
    "resnext50_32x4d",
    "resnext101_64x4d",
    "se_resnext50_32x4d",
    "se_resnext101_32x4d",
    "senet154",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "dpn68",
    "dpn92",
    "dpn98",
    "dpn107",
    "dpn131",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "mnasnet",
    "nfnet_f0",
    "igc_v1",  # IGC-L100M2; the table's other two rows follow
    "igc_v1_l4m32",
    "igc_v1_l16m16",
    "shufflenet_v1_g1",
    "shufflenet_v1_g2",
    "shufflenet_v1_g3",
    "shufflenet_v1_g4",
    "shufflenet_v1_g8",
    "attention56",
    "attention92",
    "resnet8x4",
    "resnet32x4",
    "digits_teacher",
    "digits_student",
]


def load_arch(name: str):
    return instantiate(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml").arch)


def test_every_model_of_the_seed_articles_is_in_the_zoo_for_both_roles():
    names = register_models()
    assert set(SEED_ARTICLE_MODELS) <= set(names)
    by_name = sorted(path.stem for path in (CONF_DIR / "any_model").glob("*.yaml"))  # teacher=timm ... custom
    assert by_name == ["custom", "ensemble", "timm", "torchvision"]
    assert names == model_names() + by_name  # the zoo, then the entries that take any model by name


@pytest.mark.slow
@pytest.mark.parametrize("name", model_names())
def test_zoo_model_builds_runs_and_counts_its_parameters(name):
    entry = describe(name)  # parameters counted on the meta device
    arch = load_arch(name)
    torch.manual_seed(0)
    net = arch.build(entry.num_classes).eval()
    assert sum(p.numel() for p in net.parameters()) == entry.params
    assert entry.params_m == pytest.approx(entry.params / 1e6, abs=5e-4)
    size = SMALLEST_INPUT.get(name, 32)
    with torch.inference_mode():
        logits = net(torch.rand(1, entry.input_size[0], size, size))
    assert logits.shape == (1, entry.num_classes)
    assert torch.isfinite(logits).all()
    assert entry.backend in ("timm", "torchvision", "kd") and entry.input_size[0] in (1, 3)


# Published parameter counts, in millions:
# - PaddleClas model zoo, docs/en/models/ResNet_and_vd_en.md ("Accuracy, FLOPS and Parameters"):
#   ResNet50 25.56, ResNet50_vd 25.58, ResNet101_vd 44.57, ResNet152_vd 60.21, ResNet200_vd 74.74.
# - PaddleClas model zoo, docs/en/models/Mobile_en.md: MobileNetV3_large_x1_0 5.47.
# - Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019, Table 2: EfficientNet-B0 5.3M.
PUBLISHED_MILLIONS = {
    "resnet50": 25.56,
    "resnet50_vd": 25.58,
    "resnet101_vd": 44.57,
    "resnet152_vd": 60.21,
    "resnet200_vd": 74.74,
    "mobilenet_v3_large": 5.47,
    "efficientnet_b0": 5.3,
}


@pytest.mark.parametrize(("name", "published"), PUBLISHED_MILLIONS.items())
def test_parameter_counts_agree_with_published_figures_within_one_percent(name, published):
    assert describe(name).params / 1e6 == pytest.approx(published, rel=0.01)


def test_each_model_normalizes_with_its_own_statistics():
    """An ImageNet teacher and a CIFAR student see the same [0, 1] view, each normalized its own way."""
    teacher_cfg = OmegaConf.load(CONF_DIR / "model" / "googlenet.yaml")
    student_cfg = OmegaConf.load(CONF_DIR / "model" / "resnet8x4.yaml")
    teacher_cfg.weights = student_cfg.weights = None
    teacher = build_teacher_model(teacher_cfg, 100)
    student = build_student(student_cfg, 100)
    assert teacher.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert student.mean.flatten().tolist() == pytest.approx([0.5071, 0.4867, 0.4408])
    assert student.std.flatten().tolist() == pytest.approx([0.2675, 0.2565, 0.2761])
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = student.net.eval()((images - student.mean) / student.std)
        assert torch.equal(student.eval()(images), expected)


def test_preprocessing_comes_from_timm_and_torchvision_metadata():
    inception = describe("inception_v4")
    assert inception.input_size == [3, 299, 299] and inception.interpolation == "bicubic"
    assert inception.mean == [0.5, 0.5, 0.5]  # Google's Inception weights expect [-1, 1] inputs
    alexnet = describe("alexnet")
    assert alexnet.backend == "torchvision" and alexnet.default_weights == "IMAGENET1K_V1"
    assert alexnet.interpolation == "bilinear" and alexnet.input_size == [3, 224, 224]
    cifar = describe("resnet32x4")
    assert cifar.backend == "kd" and cifar.num_classes == 100 and cifar.sources == ["file", "auto"]
    assert "pdparams" in describe("resnet152_vd").sources and "pdparams" not in describe("resnet18").sources
    paddle_only = describe("resnet200_vd")  # its weights are PaddleClas's, so is its evaluation view
    assert paddle_only.input_size == [3, 224, 224] and paddle_only.interpolation == "bilinear"
    assert paddle_only.weights == [] and paddle_only.default_weights is None


def test_table_lists_name_backend_id_params_input_and_sources():
    text = table([describe("resnet50_vd"), describe("resnet8x4")])
    header, _, vd, cifar = text.splitlines()[:4]
    assert header.split()[:4] == ["name", "backend", "id", "params"]
    assert vd.split()[:6] == ["resnet50_vd", "timm", "resnet50d", "25.58", "3x224x224", "1000"]
    assert "resnet50d.ra2_in1k" in vd and re.search(r"timm tag \(\d+\), file, pdparams$", vd)
    assert cifar.split()[:2] == ["resnet8x4", "kd"] and "1.23" in cifar


def test_zoo_cli_prints_the_named_models_with_their_multiply_adds(capsys):
    from kd.zoo import main

    assert main(["shufflenet_v1_g3", "resnet8x4", "--macs"]) == 0
    header, _, shufflenet, cifar = capsys.readouterr().out.splitlines()[:4]
    assert header.split()[:6] == ["name", "backend", "id", "params", "(M)", "GMACs"]
    assert shufflenet.split()[0] == "shufflenet_v1_g3" and shufflenet.split()[3:5] == ["1.87", "0.137"]
    assert cifar.split()[0] == "resnet8x4" and re.search(r" 1\.23 +0\.177 +3x32x32 ", cifar)  # at 32 px


@pytest.mark.slow
def test_zoo_cli_prints_json_for_every_model():
    result = subprocess.run(
        [sys.executable, "-m", "kd.zoo", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads(result.stdout)
    assert [e["name"] for e in entries] == model_names()
    for entry in entries:
        assert {"name", "backend", "id", "params_m", "input_size"} <= entry.keys()
        assert entry["params_m"] == pytest.approx(entry["params"] / 1e6, abs=5e-4)
    by_name = {e["name"]: e for e in entries}
    assert by_name["resnet200_vd"]["id"] == "resnet200d(layers=[3, 12, 48, 3])"
    assert by_name["efficientnet_b7"]["input_size"] == [3, 600, 600]
