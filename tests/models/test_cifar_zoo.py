"""The CIFAR zoo of the CRD / mdistiller tables: the reference's parameter counts, key names and shapes
(so their checkpoints load strictly), 100-class logits at 32 px, and feature stages for feature losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd.launch.configs import CONF_DIR
from kd.tasks.models import build_student, build_teacher_model
from kd.zoo import describe

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "cifar_zoo_reference.json").read_text())

# Parameters at 100 classes, measured by building the reference networks (HobbitLong/RepDistiller models/,
# the same definitions as mdistiller's models/cifar) from a fetched mirror in a scratch folder outside this
# repository and summing p.numel() over net.parameters(); tests/fixtures/cifar_zoo_reference.json holds the same
# numbers with the key names and shapes. CRD's paper rounds them: 0.70M, 2.26M (2.25M), 0.57M, 3.96M, 9.46M,
# 0.81M, 0.95M, 1.35M, 1.23M, 7.43M.
REFERENCE_PARAMS = {
    "wrn_16_2": 703_284,
    "wrn_40_2": 2_255_156,
    "wrn_40_1": 569_780,
    "vgg8_cifar": 3_965_028,
    "vgg13_cifar": 9_462_180,
    "mobilenet_v2_cifar": 812_836,
    "shufflenet_v1_cifar": 949_258,
    "shufflenet_v2_cifar": 1_355_528,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
}
NAMES = list(REFERENCE_PARAMS)


def reference_state(name: str) -> dict[str, torch.Tensor]:
    """Seeded weights with the reference's keys and shapes, scaled so that deep networks stay finite."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in REFERENCE[name]["keys"]:
        noise = torch.randn(shape, generator=generator)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + noise.abs()
        elif len(shape) > 1:  # convolutions and linear layers: He-like scale
            state[key] = noise * (2.0 / torch.tensor(shape[1:]).prod()) ** 0.5
        elif key.endswith("weight"):  # BatchNorm gamma
            state[key] = 1.0 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def reference_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def zoo_cfg(name: str, weights: str | None = None):
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg.name, cfg.weights = name, weights
    return cfg


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(zoo_cfg(name), 100).net


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_the_reference_one(name):
    assert REFERENCE[name]["params"] == REFERENCE_PARAMS[name]
    assert describe(name).params == REFERENCE_PARAMS[name]
    assert describe(name).num_classes == 100 and describe(name).input_size == [3, 32, 32]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_has_the_reference_key_names_and_shapes_in_its_order(name):
    ours = [[key, list(value.shape)] for key, value in build(name).state_dict().items()]
    assert ours == REFERENCE[name]["keys"]


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_with_the_reference_keys_loads_strictly_as_a_teacher(tmp_path, name):
    """CRD's and mdistiller's checkpoints are {"model": state_dict, ...}; every key must land in its place."""
    generator = torch.Generator().manual_seed(1)
    state = {
        key: torch.randint(0, 1000, shape, generator=generator)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in REFERENCE[name]["keys"]
    }
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": state, "epoch": 240, "accuracy": 0.0}, path)
    loaded = build_teacher_model(zoo_cfg(name, str(path)), 100).net.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_the_reference_networks_on_the_same_weights(name):
    """The logits the reference network gives for ``reference_state`` and ``reference_images`` (eval mode),
    computed once by running its code from a fetched mirror outside this repository: same weights, same
    computation, so published checkpoints predict here what they predict there."""
    net = build(name).eval()
    net.load_state_dict(reference_state(name), strict=True)
    with torch.no_grad():
        logits = net(reference_images())
    expected = torch.tensor(REFERENCE[name]["logits_first_10"])
    torch.testing.assert_close(logits[:, :10], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_forward_at_32_px_gives_100_logits_and_every_stage_of_feature_info(name):
    net = build(name).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        logits = net(images)
        final, stages = net.forward_intermediates(images)
        head = net.forward_head(final)
    assert logits.shape == (1, 100) and torch.isfinite(logits).all()
    assert torch.equal(head, logits)  # the staged pass is the forward pass
    assert len(stages) == len(net.feature_info) >= 4
    for info, stage in zip(net.feature_info, stages, strict=True):
        assert stage.shape == (1, info["num_chs"], 32 // info["reduction"], 32 // info["reduction"]), info
    assert torch.equal(stages[-1], final)
    assert build_student(zoo_cfg(name), 100).feature_info() == net.feature_info  # loss=fitnet reads it


def test_intermediates_by_index_and_through_the_classifier():
    classifier = build_student(zoo_cfg("wrn_16_2"), 100).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        normalized = classifier.normalize(images)
        every = classifier.net.forward_intermediates(normalized, intermediates_only=True)
        last_two = classifier.net.forward_intermediates(normalized, indices=2, intermediates_only=True)
        logits, picked = classifier.forward_with_features(images, (0, 2))
    assert all(torch.equal(a, b) for a, b in zip(last_two, every[-2:], strict=True))
    assert sorted(picked) == [0, 2] and torch.equal(picked[0], every[0]) and torch.equal(picked[2], every[2])
    assert torch.equal(logits, classifier(images))


def test_vgg_pools_before_its_last_block_only_from_64_px_as_the_reference():
    net = build("vgg8_cifar").eval()
    with torch.no_grad():
        small = net.forward_intermediates(torch.rand(1, 3, 32, 32), intermediates_only=True)
        large = net.forward_intermediates(torch.rand(1, 3, 64, 64), intermediates_only=True)
    assert [s.shape[-1] for s in small] == [32, 16, 8, 4, 4]
    assert [s.shape[-1] for s in large] == [64, 32, 16, 8, 4]
