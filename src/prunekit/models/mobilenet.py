"""MobileNet v1 (Howard et al. 2017) adapted to 32x32 images."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (output channels, stride) of each depthwise-separable block, as in the paper; the paper's stride-2
# stem becomes stride 1 so that a 32x32 image ends at 2x2 instead of vanishing.
MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (groups = in_channels) + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.pointwise = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(x)))


class MobileNetV1(nn.Module):
    """32-channel 3x3 stem, thirteen depthwise-separable `blocks` up to 1024 channels, average pool, `fc`."""

    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, in_planes = [], 32
        for planes, stride in MOBILENET_BLOCKS:
            blocks.append(DepthwiseSeparable(in_planes, planes, stride))
            in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
