"""``python -m kd.weights convert IN.pdparams OUT.safetensors --arch resnet50_vd``: convert weights once.

The PaddleClas file is read without PaddlePaddle, renamed onto the zoo model's timm keys, loaded into
that model strictly (so a file of another architecture stops here, with the keys named), and written
atomically as ``.safetensors`` (or ``.pth``). Later runs pass the converted file as ``weights=``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from kd.errors import KdError
from kd.io import CONF_DIR, write_atomic
from kd.models import TimmArch
from kd.weights import paddle
from kd.weights.files import check_exists, load_into


def zoo_arch(name: str) -> TimmArch | None:
    """The timm architecture of zoo entry ``name`` (PaddleClas weights map onto timm's ResNets only), or None
    when the entry is another kind of model."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise KdError(f"--arch {name} is not a zoo model; use one of {', '.join(paddle.ZOO_NAMES)}")
    settings = dict(yaml.safe_load(path.read_text())["arch"])
    if settings.pop("_target_", None) != "kd.models.TimmArch":
        return None
    return TimmArch(**settings)


def convert(source: str | Path, target: str | Path, arch_name: str) -> str:
    """Convert a PaddleClas ``.pdparams`` file for zoo model ``arch_name``; returns a one-line summary."""
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if source.suffix != ".pdparams":
        raise KdError(f"{source} is not a .pdparams file; kd.weights convert reads PaddleClas .pdparams files")
    if target.suffix not in (".safetensors", ".pth"):
        raise KdError(f"output {target} must end in .safetensors or .pth")
    arch = zoo_arch(arch_name)
    if arch is None or not paddle.supports(arch.model_name):
        raise KdError(
            f"--arch {arch_name} is not a ResNet kd can map PaddleClas weights onto; "
            f"use one of {', '.join(paddle.ZOO_NAMES)}"
        )
    check_exists(source)
    with torch.device("meta"):
        keys = set(arch.build(arch.num_classes).state_dict())
    state, layout = paddle.read_paddle_weights(source, keys)
    net = arch.build(state["fc.weight"].shape[0] if "fc.weight" in state else arch.num_classes)
    load_into(net, state, (), str(source))  # strict: the converted file is known to fit
    tensors = {key: value.contiguous() for key, value in net.state_dict().items()}
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        write_atomic(target, lambda tmp: save_file(tensors, str(tmp)))
    else:
        write_atomic(target, lambda tmp: torch.save(tensors, tmp))
    return f"converted {source} ({layout} PaddleClas layout) to {target} for {arch_name}: {len(tensors)} tensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.weights", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser("convert", help="convert a PaddleClas .pdparams file for a zoo model")
    convert_parser.add_argument("source", help="a PaddleClas .pdparams file")
    convert_parser.add_argument("target", help="the .safetensors (or .pth) file to write")
    convert_parser.add_argument("--arch", required=True, help="the zoo model the weights are for, e.g. resnet50_vd")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(convert(args.source, args.target, args.arch))
    except KdError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
