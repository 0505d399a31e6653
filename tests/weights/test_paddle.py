"""PaddleClas .pdparams weights: read without PaddlePaddle, mapped onto timm ResNets, strict."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.tasks.models import build_teacher_model
from kd.weights.convert import main as weights_main
from kd.weights.paddle import PADDLECLAS_PREPROCESSING, read_pdparams
from tests.conftest import ROOT
from tests.paddle_export import paddle_state, save_pdparams

NUM_CLASSES = 10


def zoo_cfg(name: str, weights):
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg.name, cfg.weights = name, str(weights) if weights else None
    return cfg


def random_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """The zoo model with random weights and random BatchNorm statistics (so their mapping matters)."""
    torch.manual_seed(seed)
    net = build_teacher_model(zoo_cfg(name, None), NUM_CLASSES).net.eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return net


@pytest.mark.parametrize(
    ("name", "layout", "block_style", "found"),
    [
        ("resnet50_vd", "current", "bb", "PaddleClas 2.x"),
        ("resnet50", "current", "bb", "PaddleClas 2.x"),
        ("resnet101_vd", "current", "bb", "PaddleClas 2.x"),
        ("resnet50_vd", "dygraph", "bb", "older dygraph"),
        ("resnet50_vc", "dygraph", "bb", "older dygraph"),
        ("resnet101", "dygraph", "res", "older dygraph"),  # res4a, res4b1 ... res4b22
    ],
)
def test_pdparams_layouts_load_onto_timm_and_give_the_same_logits(tmp_path, caplog, name, layout, block_style, found):
    reference = random_reference(name)
    arrays = paddle_state(reference, layout, block_style)
    path = save_pdparams(arrays, tmp_path / f"{name}.pdparams")
    with caplog.at_level(logging.INFO):
        model = build_teacher_model(zoo_cfg(name, path), NUM_CLASSES)
    assert f"{found} key layout" in caplog.text
    assert model.preprocessing == PADDLECLAS_PREPROCESSING
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.net.eval()(images), reference(images))
    assert torch.equal(
        model.net.fc.weight, torch.from_numpy(arrays["fc.weight" if layout == "current" else "out.weight"].T)
    )


def test_protocol_2_and_split_big_arrays_are_read(tmp_path):
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    # Protocol 2/3 paddle.save splits arrays over its element limit into slices, listed in a table.
    split = {
        "fc.weight@@.0": weight.reshape(-1)[:7],
        "fc.weight@@.1": weight.reshape(-1)[7:],
        "UnpackBigParamInfor@@": {"fc.weight": {"OriginShape": (3, 4), "slices": ["fc.weight@@.0", "fc.weight@@.1"]}},
        "fc.bias": np.ones(4, dtype=np.float32),
    }
    path = tmp_path / "split.pdparams"
    path.write_bytes(pickle.dumps(split, protocol=2))
    arrays = read_pdparams(path)
    assert sorted(arrays) == ["fc.bias", "fc.weight"]
    assert np.array_equal(arrays["fc.weight"], weight)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"fc.weight": Exploit()}))
    with pytest.raises(KdError, match=r"is not a PaddlePaddle \.pdparams file \(.*system is not allowed"):
        read_pdparams(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_pdparams_says_truncated(tmp_path):
    path = save_pdparams(paddle_state(random_reference("resnet50"), "current"), tmp_path / "r50.pdparams")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(KdError, match=r"r50\.pdparams is truncated \(the pickle ends after \d+ bytes\)"):
        build_teacher_model(zoo_cfg("resnet50", path), NUM_CLASSES)


def test_pdparams_of_another_architecture_names_the_keys(tmp_path):
    path = save_pdparams(paddle_state(random_reference("resnet50_vd"), "current"), tmp_path / "r50vd.pdparams")
    with pytest.raises(KdError) as error:
        build_teacher_model(zoo_cfg("resnet101_vd", path), NUM_CLASSES)
    message = str(error.value)
    assert re.search(r"do not fit this architecture \(missing keys layer3\.\d+\.", message)
    assert "\n" not in message


def test_paddleclas_resnet18_first_block_shortcut_does_not_fit_timm_resnet18(tmp_path):
    """PaddleClas 2.x gives ResNet18's first block a 1x1 shortcut conv; timm's resnet18 has none."""
    arrays = paddle_state(random_reference("resnet18"), "current")
    arrays["blocks.0.short.conv.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    for name in ("weight", "bias", "_mean", "_variance"):
        arrays[f"blocks.0.short.bn.{name}"] = np.ones(64, np.float32)
    path = save_pdparams(arrays, tmp_path / "r18.pdparams")
    with pytest.raises(KdError, match=r"unexpected keys layer1\.0\.downsample"):
        build_teacher_model(zoo_cfg("resnet18", path), NUM_CLASSES)


def test_pdparams_for_a_model_that_is_not_a_resnet_says_which_models_take_them(tmp_path):
    path = save_pdparams({"fc.weight": np.zeros((4, 4), np.float32)}, tmp_path / "densenet.pdparams")
    with pytest.raises(
        KdError, match=r"is PaddleClas weights, which kd maps onto ResNets only, not a DenseNet; use resnet50,"
    ):
        build_teacher_model(zoo_cfg("densenet121", path), NUM_CLASSES)


def test_a_non_resnet_pdparams_says_which_layouts_kd_reads(tmp_path):
    path = save_pdparams({"embed.weight": np.zeros((4, 4), np.float32)}, tmp_path / "vit.pdparams")
    with pytest.raises(
        KdError, match=r"is not a PaddleClas ResNet .*kd reads PaddleClas 2\.x keys .* or older dygraph"
    ):
        build_teacher_model(zoo_cfg("resnet50_vd", path), NUM_CLASSES)


def test_convert_writes_safetensors_that_load_as_local_weights(tmp_path, capsys):
    reference = random_reference("resnet50_vd")
    source = save_pdparams(paddle_state(reference, "dygraph"), tmp_path / "ResNet50_vd_pretrained.pdparams")
    target = tmp_path / "out" / "resnet50_vd.safetensors"
    assert weights_main(["convert", str(source), str(target), "--arch", "resnet50_vd"]) == 0
    assert "(older dygraph PaddleClas layout)" in capsys.readouterr().out
    state = load_file(str(target))
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
    model = build_teacher_model(zoo_cfg("resnet50_vd", target), NUM_CLASSES)
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.net.eval()(images), reference(images))


def test_convert_cli_rejects_an_architecture_without_mapping(tmp_path):
    source = tmp_path / "x.pdparams"
    source.write_bytes(pickle.dumps({}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd.weights",
            "convert",
            str(source),
            str(tmp_path / "x.safetensors"),
            "--arch",
            "vgg16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --arch vgg16 is not a ResNet kd can map PaddleClas weights onto; use one of resnet50, resnet101, "
        "resnet152, resnet50_vc, resnet50_vd, resnet101_vd, resnet152_vd, resnet200_vd"
    ]
    assert not (tmp_path / "x.safetensors").exists()


# --- with PaddlePaddle itself -------------------------------------------------------------------

PADDLE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import paddle
    from paddleclas.ppcls.arch.backbone.legendary_models.resnet import ResNet50_vd
    from paddleclas.ppcls.arch.backbone.model_zoo.resnet_vc import ResNet50_vc

    out = sys.argv[1]
    rng = np.random.RandomState(0)
    paddle.seed(0)
    images = rng.rand(2, 3, 64, 64).astype("float32")
    mean = np.array([0.485, 0.456, 0.406], "float32").reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], "float32").reshape(1, 3, 1, 1)
    np.save(f"{out}/images.npy", images)
    for name, build in (("ResNet50_vd", ResNet50_vd), ("ResNet50_vc", ResNet50_vc)):
        model = build(class_num=10)
        # Realistic BatchNorm statistics: one training-mode pass with momentum 0 stores the batch's own.
        for layer in model.sublayers():
            if hasattr(layer, "_momentum"):
                layer._momentum = 0.0
        model.train()
        model(paddle.to_tensor(rng.normal(0, 1, (8, 3, 64, 64)).astype("float32")))
        for key, value in model.state_dict().items():  # logits of a few units, as a trained model gives,
            if key in ("fc.weight", "out.weight"):  # so 1e-4 is well above float32 round-off
                value.set_value(value.numpy() * 0.05)
        model.eval()
        logits = model(paddle.to_tensor((images - mean) / std)).numpy()
        paddle.save(model.state_dict(), f"{out}/{name}.pdparams")
        np.save(f"{out}/{name}_logits.npy", logits)
    """
)


def paddle_python() -> str | None:
    """A python with PaddlePaddle and PaddleClas: $KD_PADDLE_PYTHON, or this one if it has them."""
    if os.environ.get("KD_PADDLE_PYTHON"):
        return os.environ["KD_PADDLE_PYTHON"]
    if importlib.util.find_spec("paddle") and importlib.util.find_spec("paddleclas"):
        return sys.executable
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    paddle_python() is None,
    reason="PaddlePaddle and PaddleClas are not installed (pip install paddlepaddle paddleclas, here or in a "
    "separate environment named by KD_PADDLE_PYTHON=/path/to/python)",
)
def test_real_paddleclas_resnets_give_the_same_logits_through_kd(tmp_path):
    result = subprocess.run(
        [paddle_python(), "-c", PADDLE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = torch.from_numpy(np.load(tmp_path / "images.npy"))
    for paddle_name, zoo_name in (("ResNet50_vd", "resnet50_vd"), ("ResNet50_vc", "resnet50_vc")):
        expected = torch.from_numpy(np.load(tmp_path / f"{paddle_name}_logits.npy"))
        model = build_teacher_model(zoo_cfg(zoo_name, tmp_path / f"{paddle_name}.pdparams"), NUM_CLASSES)
        with torch.inference_mode():
            logits = model.eval()(images)  # kd normalizes with PaddleClas's mean and std itself
        assert expected.abs().max() > 0.1  # the logits carry signal, not all zeros
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_pickle_reader_matches_plain_pickle_for_numpy(tmp_path):
    arrays = {"a": np.random.rand(3, 2).astype(np.float32), "b": np.arange(5, dtype=np.int64)}
    buffer = io.BytesIO()
    pickle.dump(arrays, buffer, protocol=4)
    path = tmp_path / "plain.pdparams"
    path.write_bytes(buffer.getvalue())
    read = read_pdparams(path)
    assert all(np.array_equal(read[k], v) and read[k].dtype == v.dtype for k, v in arrays.items())
