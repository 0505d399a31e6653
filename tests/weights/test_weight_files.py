"""Weight sources: local files in every format load bit-exactly; damaged or foreign files stop with one sentence."""

from __future__ import annotations

import importlib
import urllib.error

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.models import TimmArch, TorchvisionArch
from kd.tasks.models import build_student, build_teacher_model
from tests.conftest import run_cli

NUM_CLASSES = 100


def zoo_cfg(name: str, weights=None):
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg.name, cfg.weights = name, str(weights) if weights else None
    return cfg


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_student(zoo_cfg(name), NUM_CLASSES).net
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # buffers too, so every key is checked
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(seed + 7)
    return net.state_dict()


def write(path, state):
    """Each local format the way its tool writes it."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":  # a kd/Lightning checkpoint: the student among other modules and state
        torch.save(
            {
                "epoch": 3,
                "state_dict": {
                    **{f"student.net.{k}": v for k, v in state.items()},
                    "loss.adapter.weight": torch.ones(2),
                },
            },
            path,
        )
    elif path.suffix == ".pt":  # CRD / mdistiller checkpoints: {"model": state_dict, ...}
        torch.save({"model": state, "epoch": 240}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".safetensors"])
def test_each_local_format_loads_back_bit_exactly(tmp_path, suffix):
    state = random_state("resnet8x4", seed=1)
    path = write(tmp_path / f"resnet8x4{suffix}", state)
    loaded = build_student(zoo_cfg("resnet8x4", path), NUM_CLASSES).net.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_says_it_is_truncated(tmp_path, suffix):
    path = write(tmp_path / f"resnet8x4{suffix}", random_state("resnet8x4", seed=1))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(KdError, match=rf"weights file {path} is truncated \(.*\); copy or save it again$"):
        build_student(zoo_cfg("resnet8x4", path), NUM_CLASSES)


@pytest.mark.parametrize(
    ("suffix", "damage", "says"),
    [
        (".pth", "garbage", "is corrupt"),
        (".pth", "header", "is corrupt"),
        (".safetensors", "garbage", "is not a safetensors file"),
        (".safetensors", "header", "is corrupt"),
    ],
)
def test_a_corrupt_file_says_it_is_corrupt(tmp_path, suffix, damage, says):
    path = write(tmp_path / f"resnet8x4{suffix}", random_state("resnet8x4", seed=1))
    data = bytearray(path.read_bytes())
    if damage == "garbage":  # not a weights file at all
        data = bytearray(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    else:  # bytes of the header (zip local header / safetensors JSON) overwritten
        data[10:40] = b"\xff" * 30
    path.write_bytes(bytes(data))
    with pytest.raises(KdError) as error:
        build_student(zoo_cfg("resnet8x4", path), NUM_CLASSES)
    message = str(error.value)
    assert message.startswith(f"weights file {path} {says}") and "\n" not in message


def test_a_file_of_another_architecture_names_the_keys(tmp_path):
    narrow = write(tmp_path / "resnet8.pth", random_state("resnet8", seed=2))  # same names, other widths
    with pytest.raises(KdError) as error:
        build_student(zoo_cfg("resnet8x4", narrow), NUM_CLASSES)
    message = str(error.value)
    assert "do not fit this architecture (missing keys layer1.0.downsample.0.weight and " in message
    assert "; shape mismatch in bn1.bias (16,) vs (32,) and " in message and len(message) < 300
    deeper = write(tmp_path / "resnet20.safetensors", random_state("resnet20", seed=3))
    with pytest.raises(
        KdError, match=r"\(unexpected keys layer1\.1\.bn1\.bias and \d+ more\); pass weights saved from the same"
    ):
        build_student(zoo_cfg("resnet8", deeper), NUM_CLASSES)


def test_a_student_with_another_class_count_gets_a_new_classifier(tmp_path, caplog):
    state = random_state("resnet8x4", seed=4)
    path = write(tmp_path / "resnet8x4.safetensors", state)
    with caplog.at_level("INFO"):
        net = build_student(zoo_cfg("resnet8x4", path), 10).net
    assert "with a new 10-class classifier" in caplog.text
    assert torch.equal(net.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    with pytest.raises(KdError, match="were trained for another number of classes than the dataset's 10"):
        build_teacher_model(zoo_cfg("resnet8x4", path), 10)


def test_truncated_teacher_file_stops_the_run_with_one_line(tmp_path, cache_dir):
    path = write(tmp_path / "resnet8x4.pth", random_state("resnet8x4", seed=1))
    path.write_bytes(path.read_bytes()[:5000])
    result = run_cli(
        "teacher=resnet8x4",
        "student=resnet8",
        "data=fake",
        f"teacher.weights={path}",
        "student.weights=none",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: weights file {path} is truncated (a zip archive without its end record); copy or save it again"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "results.json").exists()


def test_a_timm_tag_of_another_architecture_stops_before_any_download():
    with pytest.raises(KdError, match=r"weights 'resnet152d\.ra2_in1k' are for timm architecture 'resnet152d', not"):
        TimmArch("resnet50d").pretrained_state("resnet152d.ra2_in1k")
    with pytest.raises(KdError, match=r"timm has no published weights for resnet200d\(layers=\[3, 12, 48, 3\]\)"):
        TimmArch("resnet200d", layers=[3, 12, 48, 3]).pretrained_state("pretrained")


def test_an_unknown_torchvision_weights_name_lists_the_valid_ones():
    with pytest.raises(KdError, match=r"'IMAGENET1K_V9' is not a torchvision weights name of alexnet; use one of"):
        TorchvisionArch("alexnet").pretrained_state("IMAGENET1K_V9")


def test_torchvision_weights_that_cannot_be_downloaded_say_how_to_give_them(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(importlib.import_module("torchvision.models._api").WeightsEnum, "get_state_dict", offline)
    with pytest.raises(KdError) as error:
        TorchvisionArch("shufflenet_v2_x1_0").pretrained_state("pretrained")
    assert str(error.value).startswith(
        "torchvision weights shufflenet_v2_x1_0 IMAGENET1K_V1 could not be downloaded (URLError: "
    )
    assert str(error.value).endswith("pass the local file as weights=/path/to/file.safetensors")


def published_weights(monkeypatch, net):
    """Stand in for torchvision's download: its weights are ``net``'s."""
    monkeypatch.setattr(
        importlib.import_module("torchvision.models._api").WeightsEnum,
        "get_state_dict",
        lambda self, *args, **kwargs: net.state_dict(),
    )


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_are_named_as_torchvision_names_them(monkeypatch, name):
    torch.manual_seed(6)
    published = torchvision.models.shufflenet_v2_x1_0().eval()
    published_weights(monkeypatch, published)
    model = build_teacher_model(zoo_cfg("shufflenet_v2_x1_0", name), 1000).eval()
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in model.net.state_dict().items())


def test_torchvision_weights_load_into_the_zoo_googlenet(monkeypatch):
    """torchvision's GoogLeNet weights carry auxiliary heads and expect transform_input; the zoo model fits them."""
    torch.manual_seed(5)
    published = torchvision.models.GoogLeNet(aux_logits=True, transform_input=True, init_weights=True).eval()
    published_weights(monkeypatch, published)
    model = build_teacher_model(zoo_cfg("googlenet", "pretrained"), 1000).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.net(images), published(images))
    assert model.preprocessing.mean == (0.485, 0.456, 0.406) and model.preprocessing.crop_pct == 224 / 256


def test_a_model_built_without_a_classifier_loads_weights_that_have_one(tmp_path, caplog):
    """An embedding teacher (timm num_classes=0) loads a classifier-trained file without its head, as timm does."""
    arch = {"_target_": "kd.models.TimmArch", "model_name": "vit_tiny_patch16_224", "img_size": 8, "patch_size": 2,
            "depth": 1, "embed_dim": 16, "num_heads": 2}  # fmt: skip
    spec = OmegaConf.create({"arch": arch, "name": "vit", "weights": None})
    torch.manual_seed(0)
    trained = build_student(spec, 10).net
    path = tmp_path / "vit.safetensors"
    save_file(trained.state_dict(), str(path))
    spec.weights, spec.arch = str(path), {**arch, "num_classes": 0}
    with caplog.at_level("INFO"):
        teacher = build_teacher_model(spec, 10)
    assert "left out its classifier (head.bias)" in caplog.text
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher.net(images), trained.forward_head(trained.forward_features(images), pre_logits=True))
    spec.arch = {**arch, "embed_dim": 32}  # the body must still fit: only the classifier is left out
    with pytest.raises(KdError, match="do not fit this architecture"):
        build_teacher_model(spec, 10)
