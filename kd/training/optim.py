"""The optimizer of a run: the torch optimizer from conf/optim, plus two Bag of Tricks switches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from kd.errors import KdError

log = logging.getLogger("kd")

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class OptimizerRecipe:
    """Builds the optimizer for a module's trainable parameters (the student and loss-side parts).

    ``no_bias_decay``: biases and other one-dimensional parameters (BatchNorm/LayerNorm gamma and beta)
    get no weight decay (timm's ``param_groups_weight_decay``). ``lr_batch_size``: the linear scaling
    rule, ``lr = optim.lr * global_batch / lr_batch_size`` (Goyal et al. 2017; 256 in Bag of Tricks),
    where the global batch is the per-device batch times devices times accumulated batches.
    """

    def __init__(
        self, optimizer: OptimizerFactory, no_bias_decay: bool = False, lr_batch_size: int | None = None
    ) -> None:
        if lr_batch_size is not None and lr_batch_size < 1:
            raise KdError(f"optim.lr_batch_size={lr_batch_size} must be a positive batch size (256 for ImageNet)")
        self.optimizer = optimizer
        self.no_bias_decay = no_bias_decay
        self.lr_batch_size = lr_batch_size

    @property
    def base_lr(self) -> float | None:
        return self.optimizer.keywords.get("lr") if isinstance(self.optimizer, partial) else None

    def lr_for(self, global_batch: int | None) -> float | None:
        """The LR the optimizer gets: ``optim.lr``, scaled to the global batch when the rule is on."""
        if self.lr_batch_size is None or self.base_lr is None:
            return self.base_lr
        if not global_batch:
            raise KdError("optim.lr_batch_size scales the LR by the batch size, but the batch size is unknown")
        return self.base_lr * global_batch / self.lr_batch_size

    def __call__(self, model: nn.Module, global_batch: int | None = None) -> torch.optim.Optimizer:
        settings = {}
        if self.lr_batch_size is not None:
            settings["lr"] = self.lr_for(global_batch)
            log.info(
                "linear LR scaling: optim.lr %g for %d images x global batch %d = %g",
                self.base_lr,
                self.lr_batch_size,
                global_batch,
                settings["lr"],
            )
        if self.no_bias_decay:
            decay = self.optimizer.keywords.get("weight_decay", 0.0) if isinstance(self.optimizer, partial) else 0.0
            return self.optimizer(param_groups_weight_decay(model, weight_decay=decay), **settings)
        return self.optimizer([p for p in model.parameters() if p.requires_grad], **settings)
