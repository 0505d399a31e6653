from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from kd.models.layers import tapped


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a network: what its weights were trained with."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # (channels, height, width)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """A network plus its own input normalization.

    Data modules yield images in [0, 1]; each model normalizes them with its own mean and std here,
    so a teacher and a student trained with different statistics both see the same view correctly.
    """

    def __init__(self, net: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.net = net
        self.preprocessing = preprocessing
        shape = (1, preprocessing.in_chans, 1, 1)
        # Not persistent: checkpoints and exported weights hold the network's own keys only.
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(shape), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.preprocessing.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)  # grayscale data into an RGB network
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))

    def feature_info(self) -> list[dict]:
        """The network's stages (timm's ``feature_info``: ``num_chs``, ``reduction``, ``module`` per stage);
        empty when the network does not expose intermediate features."""
        info = getattr(self.net, "feature_info", None)
        has_api = callable(getattr(self.net, "forward_intermediates", None)) and callable(
            getattr(self.net, "forward_head", None)
        )
        return list(info) if info is not None and has_api else []

    def forward_with_features(
        self, images: torch.Tensor, stages: tuple[int | str, ...] = ()
    ) -> tuple[torch.Tensor, dict[int | str, torch.Tensor]]:
        """Logits, and the feature maps of ``stages`` from the same forward pass: indices into ``feature_info``
        (already non-negative; timm's ``forward_intermediates`` then ``forward_head``) and module names
        (``named_modules()`` of the network, read by forward hooks, ``kd.models.layers``)."""
        if not stages:
            return self(images), {}
        indices = sorted(s for s in stages if isinstance(s, int))
        names = [s for s in stages if isinstance(s, str)]
        normalized = self.normalize(images)
        with tapped(self.net, names, tuple(normalized.shape[-2:])) as named:
            if indices:
                final, intermediates = self.net.forward_intermediates(normalized, indices=indices)
                logits, features = self.net.forward_head(final), dict(zip(indices, intermediates, strict=True))
            else:
                logits, features = self.net(normalized), {}
        return logits, {**features, **named}
