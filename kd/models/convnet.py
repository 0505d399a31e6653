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
    The digits default uses it as teacher (6 x 64) and student (2 x 8)."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for index in range(depth):
            layers.append(conv_bn_relu(channels, width))
            channels = width
            if index % 2 == 1 and index < depth - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
