from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """A plain CNN for small images: ``depth`` 3x3 conv-BN-ReLU blocks of ``width`` channels,
    a 2x2 max-pool after every second block, global average pooling and a linear classifier.
    The digits default uses it as teacher (6 x 64) and student (2 x 8).

    Like a timm model it lists its stages in ``feature_info`` (one per conv block) and offers
    ``forward_intermediates`` / ``forward_head``, so feature distillation (``loss=fitnet``) works on it.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.feature_info: list[dict] = []
        channels, reduction = in_chans, 1
        for index in range(depth):
            layers.append(conv_bn_relu(channels, width))
            channels = width
            self.feature_info.append(
                {"num_chs": width, "reduction": reduction, "module": f"features.{len(layers) - 1}"}
            )
            if index % 2 == 1 and index < depth - 1:
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, intermediates_only: bool = False, **_
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: the outputs of the stages in ``indices`` (an int n: the last n), and the
        final feature map that ``forward_head`` turns into logits."""
        count = len(self.feature_info)
        if indices is None:
            indices = list(range(count))
        elif isinstance(indices, int):
            indices = list(range(count - indices, count))
        wanted = {i % count for i in indices}
        stage_of = {info["module"]: stage for stage, info in enumerate(self.feature_info)}
        intermediates = []
        for name, layer in self.features.named_children():
            x = layer(x)
            if stage_of.get(f"features.{name}") in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)
