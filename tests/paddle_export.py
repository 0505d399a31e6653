"""Write a timm ResNet's weights as PaddleClas would have saved them, for the .pdparams tests.

Names follow PaddleClas's own construction loops: ``ppcls/arch/backbone/legendary_models/resnet.py``
(2.x: ``stem.K``, one flat ``blocks.N``, ``conv``/``bn``, ``fc``) and the 2.0 dygraph models
``ppcls/modeling/architectures/resnet_vd.py`` and ``resnet_vc.py`` (``conv1_1``..``conv1_3``, blocks added
as ``bb_{stage}_{i}``, ``_conv``/``_batch_norm``, ``out``) and ``resnet.py`` (``conv``, blocks added as
``res2a``, ..., ``res4b1``, ...). Arrays are NumPy, BatchNorm statistics are ``_mean``/``_variance`` and
the Linear weight is stored [in, out], as Paddle does.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from torch import nn

BN = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}


def stage_depths(net: nn.Module) -> list[int]:
    return [len(getattr(net, f"layer{i}")) for i in range(1, 5)]


def dygraph_block_name(stage: int, index: int, depths: list[int], style: str) -> str:
    if style == "bb":
        return f"bb_{stage}_{index}"
    if depths in ([3, 4, 23, 3], [3, 8, 36, 3]) and stage == 2:  # PaddleClas: layers in [101, 152] and block == 2
        return f"res{stage + 2}a" if index == 0 else f"res{stage + 2}b{index}"
    return f"res{stage + 2}{chr(97 + index)}"


def paddle_state(net: nn.Module, layout: str, block_style: str = "bb") -> dict[str, np.ndarray]:
    """``layout``: "current" (PaddleClas 2.x) or "dygraph" (2.0; ``block_style`` "bb" or "res")."""
    timm = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    deep_stem = "conv1.0.weight" in timm
    conv_attr, bn_attr = ("conv", "bn") if layout == "current" else ("_conv", "_batch_norm")
    out: dict[str, np.ndarray] = {}

    def conv_bn(paddle_prefix: str, timm_conv: str, timm_bn: str) -> None:
        out[f"{paddle_prefix}.{conv_attr}.weight"] = timm[f"{timm_conv}.weight"]
        for paddle_name, timm_name in BN.items():
            out[f"{paddle_prefix}.{bn_attr}.{paddle_name}"] = timm[f"{timm_bn}.{timm_name}"]

    if deep_stem:
        stem = ["stem.0", "stem.1", "stem.2"] if layout == "current" else ["conv1_1", "conv1_2", "conv1_3"]
        timm_stem = [("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1")]
        for prefix, (conv, bn) in zip(stem, timm_stem, strict=True):
            conv_bn(prefix, conv, bn)
    else:
        conv_bn("stem.0" if layout == "current" else "conv", "conv1", "bn1")

    depths = stage_depths(net)
    flat = 0
    for stage, depth in enumerate(depths):
        for index in range(depth):
            block = f"layer{stage + 1}.{index}"
            prefix = f"blocks.{flat}" if layout == "current" else dygraph_block_name(stage, index, depths, block_style)
            flat += 1
            for number in range(3 if f"{block}.conv3.weight" in timm else 2):  # bottleneck or basic block
                conv_bn(f"{prefix}.conv{number}", f"{block}.conv{number + 1}", f"{block}.bn{number + 1}")
            if f"{block}.downsample.2.weight" in timm:  # avg pool, conv, bn
                conv_bn(f"{prefix}.short", f"{block}.downsample.1", f"{block}.downsample.2")
            elif f"{block}.downsample.0.weight" in timm:
                conv_bn(f"{prefix}.short", f"{block}.downsample.0", f"{block}.downsample.1")
    fc = "fc" if layout == "current" else "out"
    out[f"{fc}.weight"] = np.ascontiguousarray(timm["fc.weight"].T)
    out[f"{fc}.bias"] = timm["fc.bias"]
    return out


def save_pdparams(arrays: dict[str, np.ndarray], path: Path, protocol: int = 4) -> Path:
    """As ``paddle.save(state_dict)``: the arrays plus Paddle's table of internal parameter names."""
    table = {key: f"param_{i}.w_0" for i, key in enumerate(arrays)}
    with open(path, "wb") as f:
        pickle.dump({**arrays, "StructuredToParameterName@@": table}, f, protocol=protocol)
    return path
