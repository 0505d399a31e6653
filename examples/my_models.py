"""A user's own network, for ``teacher=custom`` / ``student=custom`` (see the README, "Bring your own models").

Any ``nn.Module`` works whose constructor takes ``num_classes`` (and ``in_chans`` if it wants the channel count);
its other arguments come from the command line: ``+student.net.width=32``.
"""

from __future__ import annotations

from torch import nn


class Net(nn.Module):
    """Two 3x3 conv blocks, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images):
        return self.head(self.features(images))
