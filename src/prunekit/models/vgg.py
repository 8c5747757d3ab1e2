"""VGG-16 with batch norm, CIFAR variant: thirteen 3x3 conv layers and one linear classifier."""
from __future__ import annotations

import torch
from torch import nn

# Output channels of each 3x3 conv+BN+ReLU; "M" is a 2x2 max-pool. Five pools take 32x32 down to 1x1.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _vgg_features(layout: tuple[int | str, ...], in_channels: int) -> nn.Sequential:
    """Conv+BN+ReLU and max-pool layers following `layout`."""
    layers: list[nn.Module] = []
    for entry in layout:
        if entry == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_channels, entry, 3, padding=1, bias=False), nn.BatchNorm2d(entry), nn.ReLU()]
            in_channels = entry
    return nn.Sequential(*layers)


class VGG16BN(nn.Module):
    """VGG-16-BN for 32x32 images: `features`, then `classifier` (512 -> classes)."""

    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        self.features = _vgg_features(VGG16_LAYOUT, in_channels)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
