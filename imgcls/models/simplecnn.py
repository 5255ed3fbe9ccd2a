"""A small CNN trained from scratch: a fast baseline and the model the tests train."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from imgcls.models.builders import builds, classifier_head


class SimpleCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks of `width`, 2*width and 4*width channels, global average
    pooling, dropout and a linear head (about 93k parameters at width 32)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = classifier_head(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@builds("simplecnn")
def simplecnn(num_classes: int, in_channels: int, dropout: float, *,
              image_size: int | None, weights: Path | None) -> nn.Module:
    del image_size, weights  # any size from 8px; no pretrained weights (none in the catalog)
    return SimpleCNN(in_channels, num_classes, dropout=dropout)
