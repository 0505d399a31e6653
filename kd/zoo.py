"""The model zoo: every ``conf/model/<name>.yaml``, usable as ``teacher=<name>`` or ``student=<name>``.

``python -m kd.zoo`` prints a table (backend and id, parameters, default input, weight sources);
``python -m kd.zoo --json`` prints the same as a JSON list. ``python -m kd.zoo NAME ... --macs`` prints only those
models, with the multiply-adds of one image at the model's input size. Parameters and multiply-adds are counted
on PyTorch's meta device: the network is built and run without allocating or initializing any weight.
``python -m kd.zoo layers MODEL`` prints MODEL's module names (what ``loss.student_layers`` / ``loss.teacher_layers``
take) with their output shapes, from one forward pass of a zero image at the model's input size (random weights).
MODEL is a zoo name, timm:NAME, torchvision:NAME, or a timm name.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from kd.launch.configs import CONF_DIR
from kd.weights import paddle

NAMED = {"timm": "tag", "torchvision": "weights"}  # what a backend calls its published weights
FILE_SOURCE = "file"  # .pth / .pt / .ckpt / .safetensors
PADDLE_SOURCE = "pdparams"


@dataclass
class ZooEntry:
    name: str
    backend: str
    id: str
    params_m: float
    params: int
    num_classes: int
    input_size: list[int]
    interpolation: str
    mean: list[float]
    std: list[float]
    default_weights: str | None
    weights: list[str]  # published weights by name (timm tags, torchvision weights names)
    sources: list[str]  # the kinds of weights= this model takes
    macs: int | None = None  # multiply-adds of one image at input_size (--macs)


def model_names(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(path.stem for path in (conf_dir / "model").glob("*.yaml"))


def count_parameters(arch, num_classes: int) -> int:
    with torch.device("meta"):
        net = arch.build(num_classes)
    return sum(parameter.numel() for parameter in net.parameters())


def count_macs(arch, num_classes: int, input_size: tuple[int, ...]) -> int:
    """Multiply-adds of one image's forward pass: FlopCounterMode's FLOPs (2 per multiply-add of the convolutions
    and matrix products) halved, the unit the architecture papers report as "FLOPs"."""
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        net = arch.build(num_classes).eval()
        with counter:
            net(torch.zeros(1, *input_size))
    return counter.get_total_flops() // 2


def describe(name: str, conf_dir: Path = CONF_DIR, macs: bool = False) -> ZooEntry:
    cfg = OmegaConf.load(conf_dir / "model" / f"{name}.yaml")
    arch = instantiate(cfg.arch)
    preprocessing = arch.preprocessing()
    names = arch.weight_names()
    sources = ([f"{arch.backend} {NAMED[arch.backend]}"] if names else []) + [FILE_SOURCE]
    if arch.backend == "timm" and paddle.supports(arch.model_name):
        sources.append(PADDLE_SOURCE)
    if cfg.get("pretrain") is not None:
        sources.append("auto")
    params = count_parameters(arch, arch.num_classes)
    default = None if cfg.get("weights") in (None, "none") else str(cfg.weights)
    return ZooEntry(
        name=name,
        backend=arch.backend,
        id=arch.id,
        params_m=round(params / 1e6, 3),
        params=params,
        num_classes=arch.num_classes,
        input_size=list(preprocessing.input_size),
        interpolation=preprocessing.interpolation,
        mean=[round(v, 4) for v in preprocessing.mean],
        std=[round(v, 4) for v in preprocessing.std],
        default_weights=names[0] if default == "pretrained" and names else default,
        weights=names,
        sources=sources,
        macs=count_macs(arch, arch.num_classes, preprocessing.input_size) if macs else None,
    )


def zoo(conf_dir: Path = CONF_DIR, names: list[str] | None = None, macs: bool = False) -> list[ZooEntry]:
    return [describe(name, conf_dir, macs) for name in names or model_names(conf_dir)]


def table(entries: list[ZooEntry]) -> str:
    with_macs = any(e.macs is not None for e in entries)
    header = ("name", "backend", "id", "params (M)") + ("GMACs",) * with_macs
    header += ("input", "classes", "default weights", "other weight sources")
    rows = [
        (
            e.name,
            e.backend,
            e.id,
            f"{e.params / 1e6:.2f}" if e.params >= 100_000 else f"{e.params / 1e6:.4f}",
            *([f"{e.macs / 1e9:.3f}" if e.macs is not None else "-"] * with_macs),
            "x".join(map(str, e.input_size)),
            str(e.num_classes),
            e.default_weights or "none",
            ", ".join(
                f"{s} ({len(e.weights)})" if s.split()[0] in NAMED else s for s in e.sources if s != e.default_weights
            ),
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 6} if with_macs else {3, 5}  # numbers

    def line(cells) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    legend = [
        *(["", "GMACs: 10^9 multiply-adds of one image at the input size (FLOPs in the papers' tables)"] * with_macs),
        "",
        "weight sources (teacher.weights= / student.weights=):",
        "  pretrained           the default weights above (timm and torchvision download them where a network is",
        "                       allowed; offline, pass the downloaded file)",
        "  timm tag (N)         N timm tags, e.g. resnet50d.ra2_in1k (python -m kd.zoo --json lists them)",
        "  torchvision weights  a torchvision weights name, e.g. IMAGENET1K_V1",
        "  file                 a local .pth / .pt / .ckpt (kd or Lightning checkpoint) / .safetensors file",
        "  pdparams             a PaddleClas .pdparams file, read without PaddlePaddle",
        "  auto                 trained once with task=train on the run's data and cached",
        "  none                 random initialization",
    ]
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), *legend])


def layers(spec: str, image_size: int | None = None) -> str:
    """The module table of ``spec`` (see the module docstring)."""
    from kd.errors import KdError
    from kd.models.layers import layer_table
    from kd.models.members import BACKENDS
    from kd.tasks.models import member_config

    if ":" not in spec and not (CONF_DIR / "model" / f"{spec}.yaml").is_file():
        spec = f"timm:{spec}"  # a bare timm name; refused with the closest timm names if it is none
    backend = spec.partition(":")[0]
    try:
        cfg = member_config(spec)
    except KdError:
        if backend not in BACKENDS:
            raise
        raise KdError(
            f"'{spec}' is no zoo model, timm:NAME or torchvision:NAME; python -m kd.zoo lists the zoo"
        ) from None
    arch = instantiate(cfg.arch)
    net = arch.build(arch.num_classes)
    size = list(arch.preprocessing().input_size)
    if image_size is not None:
        size[1:] = [image_size, image_size]
    try:
        table_rows = layer_table(net, torch.zeros(1, *size))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise KdError(
            f"{spec} does not run on {'x'.join(map(str, size))} images ({type(error).__name__}); give its own size "
            "(leave out --image-size)"
        ) from None
    rows = [("module", "type", "output"), *table_rows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([f"{spec}: input {'x'.join(map(str, size))}", *lines])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["layers"]:
        parser = argparse.ArgumentParser(prog="python -m kd.zoo layers", description="a model's module names")
        parser.add_argument("model", help="a zoo name, timm:NAME, torchvision:NAME or a timm name")
        parser.add_argument(
            "--image-size", type=int, default=None, help="the probe image's side (default: the model's)"
        )
        args = parser.parse_args(argv[1:])
        try:
            print(layers(args.model, args.image_size))
        except Exception as error:  # a user's mistake is one line; anything else is re-raised
            from kd.launch.run import user_error

            refused = user_error(error)
            if refused is None:
                raise
            print(f"error: {refused}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="python -m kd.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these models (default: the whole zoo)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--macs", action="store_true", help="also count multiply-adds at the input size")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(model_names()))
    if unknown:
        parser.error(f"{', '.join(unknown)} not in the zoo; python -m kd.zoo lists it")
    entries = zoo(names=args.names, macs=args.macs)
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
    else:
        print(table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
