"""PaddleClas ``.pdparams`` weights for timm ResNets, read without PaddlePaddle.

``paddle.save(layer.state_dict(), path)`` writes a plain pickle (protocol 2 to 4) of a dict mapping
structured parameter names to NumPy arrays, plus a ``StructuredToParameterName@@`` table of Paddle's
internal names and, for arrays split by protocols 2 and 3, an ``UnpackBigParamInfor@@`` table. We
unpickle it with an allow-list (NumPy arrays and dtypes only: no code from the file ever runs) and
rename the keys onto timm's ResNet:

================================  ====================================  ===========================
                                  PaddleClas 2.x (``legendary_models``)  older dygraph (2.0, ``_vc``)
================================  ====================================  ===========================
3x3 deep stem (vd, vc)            ``stem.{0,1,2}.conv`` / ``.bn``        ``conv1_{1,2,3}._conv`` /
                                                                         ``._batch_norm``
7x7 stem (plain ResNet)           ``stem.0.conv`` / ``.bn``              ``conv._conv`` / ``._batch_norm``
block ``i`` of stage ``s``        ``blocks.{flat index}``                ``bb_{s}_{i}`` or ``res{s+2}{a,b..}``
convs of a block                  ``conv0, conv1, conv2`` -> timm ``conv1..3`` / ``bn1..3``
shortcut                          ``short`` -> timm ``downsample`` (after the avg pool in ``_vd``)
classifier                        ``fc`` (weight stored [in, out])       ``out``
================================  ====================================  ===========================

BatchNorm ``_mean`` / ``_variance`` are timm's ``running_mean`` / ``running_var``; Paddle's Linear
stores its weight transposed. The flat ``blocks.N`` index is split into stages at each block that has
a ``short`` convolution (every stage of a bottleneck ResNet starts with one).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.errors import KdError
from kd.models.classifier import Preprocessing

log = logging.getLogger(__name__)

NAME_TABLE = "StructuredToParameterName@@"
SPLIT_TABLE = "UnpackBigParamInfor@@"

# PaddleClas's ImageNet evaluation: resize the short side to 256 (cv2 bilinear), center crop 224,
# scale to [0, 1] and normalize with the ImageNet mean and std (ppcls/configs/ImageNet/ResNet/*.yaml).
PADDLECLAS_PREPROCESSING = Preprocessing(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    input_size=(3, 224, 224),
    interpolation="bilinear",
    crop_pct=224 / 256,
)

# The zoo models backed by those timm ResNets (the names --arch and the error messages offer).
ZOO_NAMES = (
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50_vc",
    "resnet50_vd",
    "resnet101_vd",
    "resnet152_vd",
    "resnet200_vd",
)
# timm ResNets whose layout PaddleClas's ResNet / ResNet_vc / ResNet_vd share. PaddleClas's ResNet18/34
# (and their _vd) give the first block a 1x1 shortcut convolution that timm's resnet18/34 do not have.
SUPPORTED_TIMM_MODELS = (
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50c",
    "resnet50d",
    "resnet101d",
    "resnet152d",
    "resnet200d",
)

# What a .pdparams pickle may construct: NumPy arrays, their dtypes and scalars, and the tuple
# paddle's non-state-dict saver wraps tensors in. Anything else is refused before it runs.
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol 2 stores array bytes as latin-1 text
    ("builtins", "tuple"),
    ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a .pdparams file")
        return super().find_class(module, name)


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.pdparams`` file, by structured name (Paddle's own tables removed)."""
    path = Path(path).expanduser()
    data = path.read_bytes()
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except EOFError:
        raise KdError(
            f"weights file {path} is truncated (the pickle ends after {len(data)} bytes); copy or download it again"
        ) from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        if "truncated" in str(error):
            raise KdError(
                f"weights file {path} is truncated (the pickle ends after {len(data)} bytes); copy or download it again"
            ) from None
        raise KdError(
            f"weights file {path} is not a PaddlePaddle .pdparams file ({str(error)[:100]}); "
            "pass a file written by paddle.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, dict):
        raise KdError(f"weights file {path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    return _arrays(obj, path)


def _arrays(obj: dict, path: Path) -> dict[str, np.ndarray]:
    obj = dict(obj)
    obj.pop(NAME_TABLE, None)
    for key, info in obj.pop(SPLIT_TABLE, {}).items():  # big arrays split into slices by protocols 2-3
        obj[key] = np.concatenate([obj.pop(part) for part in info["slices"]]).reshape(info["OriginShape"])
    arrays = {}
    for key, value in obj.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # paddle's generic saver stores a tensor as (name, array)
        if not isinstance(value, np.ndarray):
            raise KdError(
                f"weights file {path} has a {type(value).__name__} under '{key}', not an array; "
                "pass a file written by paddle.save(model.state_dict(), path)"
            )
        arrays[key] = value
    return arrays


@dataclass(frozen=True)
class PaddleResNet:
    """The parts of a PaddleClas ResNet state dict, by key prefix."""

    layout: str  # "PaddleClas 2.x" or "older dygraph"
    stem: list[str]  # ConvBNLayer prefixes, input first
    blocks: dict[tuple[int, int], str]  # (stage, index in stage) -> block prefix
    fc: str
    conv: str  # a ConvBNLayer's conv and BatchNorm attribute names
    bn: str


LAYOUT_HELP = (
    "PaddleClas 2.x keys (stem.0.conv.weight, blocks.N.conv0.conv.weight, fc.weight) or older dygraph "
    "keys (conv1_1._conv.weight, bb_S_I.conv0._conv.weight, out.weight)"
)


def detect_layout(keys: list[str], path: Path) -> PaddleResNet:
    """Recognize which PaddleClas ResNet key layout ``keys`` follow."""
    prefixes = {key.split(".")[0] for key in keys}
    if "stem" in prefixes and "blocks" in prefixes:
        return _current_layout(keys)
    if {"conv1_1", "out"} <= prefixes or {"conv", "out"} <= prefixes:
        return _dygraph_layout(keys, prefixes)
    raise KdError(
        f"weights file {path} is not a PaddleClas ResNet ({len(keys)} keys such as {', '.join(sorted(keys)[:3])}); "
        f"kd reads {LAYOUT_HELP}"
    )


def _current_layout(keys: list[str]) -> PaddleResNet:
    stem = sorted({int(k.split(".")[1]) for k in keys if k.startswith("stem.")})
    flat = sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})
    with_short = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and ".short." in k}
    blocks, stage, index = {}, 0, 0
    for number in flat:
        if number in with_short and number != flat[0]:
            stage, index = stage + 1, 0
        blocks[(stage, index)] = f"blocks.{number}"
        index += 1
    return PaddleResNet("PaddleClas 2.x", [f"stem.{i}" for i in stem], blocks, "fc", "conv", "bn")


DYGRAPH_BLOCK = re.compile(r"^bb_(\d+)_(\d+)$")
# ppcls/modeling/architectures/resnet.py names blocks res2a, res2b, ..., and res4a, res4b1, res4b2, ...
# in the third stage of ResNet101/152.
DYGRAPH_RES_BLOCK = re.compile(r"^res(\d)([a-z])(\d*)$")


def _dygraph_layout(keys: list[str], prefixes: set[str]) -> PaddleResNet:
    blocks = {}
    for prefix in prefixes:
        if match := DYGRAPH_BLOCK.match(prefix):
            blocks[(int(match[1]), int(match[2]))] = prefix
        elif match := DYGRAPH_RES_BLOCK.match(prefix):
            index = int(match[3]) if match[3] else ord(match[2]) - ord("a")
            blocks[(int(match[1]) - 2, index)] = prefix
    stem = ["conv1_1", "conv1_2", "conv1_3"] if "conv1_1" in prefixes else ["conv"]
    return PaddleResNet("older dygraph", stem, dict(sorted(blocks.items())), "out", "_conv", "_batch_norm")


BN_NAMES = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}


def to_timm_resnet(arrays: dict[str, np.ndarray], target_keys: set[str], path: Path) -> tuple[dict, str]:
    """Rename a PaddleClas ResNet state dict onto timm's; returns the state and the layout found.

    ``target_keys`` are the timm model's keys: they say whether its shortcut starts with an average
    pool (``_vd``: ``downsample.1`` is the conv) or not (plain, ``_vc``: ``downsample.0``).
    """
    layout = detect_layout(list(arrays), path)
    pairs: list[tuple[str, str, str]] = []  # (paddle ConvBNLayer prefix, timm conv, timm BatchNorm)
    if len(layout.stem) == 3:
        pairs += [(layout.stem[0], "conv1.0", "conv1.1"), (layout.stem[1], "conv1.3", "conv1.4")]
        pairs += [(layout.stem[2], "conv1.6", "bn1")]
    else:
        pairs += [(layout.stem[0], "conv1", "bn1")]
    for (stage, index), prefix in layout.blocks.items():
        block = f"layer{stage + 1}.{index}"
        for number in range(3):
            pairs.append((f"{prefix}.conv{number}", f"{block}.conv{number + 1}", f"{block}.bn{number + 1}"))
        pooled = f"{block}.downsample.2.weight" in target_keys
        conv, bn = ("downsample.1", "downsample.2") if pooled else ("downsample.0", "downsample.1")
        pairs.append((f"{prefix}.short", f"{block}.{conv}", f"{block}.{bn}"))
    renames: dict[str, str] = {}  # paddle key -> timm key
    for paddle_prefix, conv, bn in pairs:
        renames[f"{paddle_prefix}.{layout.conv}.weight"] = f"{conv}.weight"
        for paddle_name, timm_name in BN_NAMES.items():
            renames[f"{paddle_prefix}.{layout.bn}.{paddle_name}"] = f"{bn}.{timm_name}"
    renames[f"{layout.fc}.weight"] = "fc.weight"
    renames[f"{layout.fc}.bias"] = "fc.bias"

    unknown = sorted(key for key in arrays if key not in renames)
    if unknown:
        raise KdError(
            f"weights file {path} ({layout.layout} layout) has keys kd cannot map onto a timm ResNet "
            f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); kd reads PaddleClas ResNet and ResNet_vd"
        )
    state = {}
    for key, array in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        state[renames[key]] = tensor.t().contiguous() if renames[key] == "fc.weight" else tensor
    for key in target_keys:  # PyTorch counts BatchNorm updates; Paddle keeps no such counter
        if key.endswith("num_batches_tracked") and key.replace("num_batches_tracked", "running_mean") in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    return state, layout.layout


def read_paddle_weights(path: str | Path, target_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Read a PaddleClas ``.pdparams`` file as a state dict for the timm ResNet with ``target_keys``."""
    path = Path(path).expanduser()
    state, layout = to_timm_resnet(read_pdparams(path), target_keys, path)
    log.info("read %s: PaddleClas ResNet weights in the %s key layout (%d tensors)", path, layout, len(state))
    return state, layout


def read_for(path: str | Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A ``.pdparams`` file as a state dict for ``net``, which must be one of the timm ResNets kd maps onto."""
    from timm.models.resnet import ResNet

    if not isinstance(net, ResNet):
        raise KdError(
            f"weights file {path} is PaddleClas weights, which kd maps onto ResNets only, not a "
            f"{type(net).__name__}; use {', '.join(ZOO_NAMES)}"
        )
    state, _ = read_paddle_weights(path, set(net.state_dict()))
    return state


def supports(model_name: str) -> bool:
    return model_name in SUPPORTED_TIMM_MODELS
