"""Features from any named module (``named_modules()``: ``layer3``, ``blocks.6``, ``features.12``), read with forward
hooks in the same forward pass as the logits, as torchdistill's ``ForwardHookManager`` does.

A vision transformer's tokens (N, L, C) become a map (N, C, H, W): its class and distillation tokens
(``num_prefix_tokens``) are dropped and the patch grid comes from the model (``patch_embed``). A pooled (N, C)
output becomes (N, C, 1, 1). Every feature loss then sees maps, whatever network gave them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from kd.errors import KdError


def module_names(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_modules() if name]


def check_layers(net: nn.Module, names: Sequence[str], role: str, key: str) -> tuple[str, ...]:
    """``names`` as they are, refused in one sentence with the closest module names when one is not in ``net``."""
    known = set(module_names(net))
    for name in names:
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=3, cutoff=0.4) or module_names(net)[:3]
            raise KdError(
                f"loss.{key} has '{name}', which is no module of the {role} ({type(net).__name__}); did you mean "
                f"{', '.join(close)}? (python -m kd.zoo layers MODEL lists them)"
            )
    return tuple(names)


def expected_grid(net: nn.Module, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """timm's patch grid of ``net`` for this input size, None for a network without ``patch_embed``."""
    embed = getattr(net, "patch_embed", None)
    if embed is None:
        return None
    if callable(getattr(embed, "dynamic_feat_size", None)):
        grid = tuple(embed.dynamic_feat_size(image_size))
    else:
        grid = tuple(getattr(embed, "grid_size", ()) or ())
    return (int(grid[0]), int(grid[1])) if len(grid) == 2 else None


def patch_grid(net: nn.Module, tokens: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) grid of ``tokens`` patch tokens: timm's ``patch_embed`` grid for this input size, else square."""
    grid = expected_grid(net, image_size)
    if grid is not None and grid[0] * grid[1] == tokens:
        return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise KdError(
            f"a named layer of {type(net).__name__} gives {tokens} tokens, which form no square patch grid; "
            "choose a layer that gives a feature map (N, C, H, W)"
        )
    return side, side


def as_map(output, net: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
    """A module's output as a feature map (N, C, H, W): tokens (N, L, C) without prefix tokens, on the patch grid."""
    if isinstance(output, tuple | list):  # modules that return (features, extra): the features
        output = output[0]
    if output.dim() == 4:
        return output
    if output.dim() == 2:
        return output[:, :, None, None]
    if output.dim() == 3:
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        grid = expected_grid(net, image_size)
        if grid is not None and output.shape[1] == grid[0] * grid[1]:
            prefix = 0  # patch tokens only (patch_embed's output): nothing to drop
        tokens = output[:, prefix:]
        height, width = patch_grid(net, tokens.shape[1], image_size)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
    raise KdError(f"a named layer of {type(net).__name__} gives a {output.dim()}-d output; choose one giving a map")


@contextmanager
def tapped(net: nn.Module, names: Sequence[str], image_size: tuple[int, int]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: the outputs of the modules named ``names`` (as maps) land in the yielded dict, by name, as the
    network runs; the hooks are gone on leaving."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            outputs[name] = as_map(output, net, image_size)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_table(net: nn.Module, images: torch.Tensor) -> list[tuple[str, str, str]]:
    """(name, module type, output shape) of every named module, from one forward pass of ``images``."""
    shapes: dict[str, str] = {}
    handles = []
    for name, module in net.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            first = output[0] if isinstance(output, tuple | list) and output else output
            shapes.setdefault(name, "x".join(map(str, first.shape)) if isinstance(first, torch.Tensor) else "-")

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return [
        (name, type(module).__name__, shapes.get(name, "(not run)")) for name, module in net.named_modules() if name
    ]
