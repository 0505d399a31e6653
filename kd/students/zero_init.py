"""Initialization choices for networks trained from scratch."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def residual_blocks(net: nn.Module) -> list[nn.Module]:
    """Residual blocks as timm marks them: modules with a ``zero_init_last()`` method."""
    return [m for m in net.modules() if callable(getattr(m, "zero_init_last", None))]


def init_last_bn(net: nn.Module, zero: bool) -> int:
    """Start the last BatchNorm gamma of every residual block at 0 (``zero``: each block starts as the
    identity, Goyal et al. 2017 / Bag of Tricks) or at 1 (PyTorch's default). Returns the block count.

    timm's own ``zero_init_last()`` picks the BatchNorm; with ``zero=False`` the gammas it zeroed are
    set back to 1 (timm zero-initializes them by default, kd only when asked).
    """
    blocks = residual_blocks(net)
    for block in blocks:
        block.zero_init_last()
        if not zero:
            for module in block.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, _BatchNorm) and weight is not None and not weight.detach().any():
                    nn.init.ones_(weight)
    return len(blocks)
