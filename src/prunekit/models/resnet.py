"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56 and the wider four-stage ResNet-18 variant."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from prunekit.errors import PrunekitError

Shortcut = Literal["projection", "identity"]
SHORTCUTS: tuple[str, ...] = ("projection", "identity")


class PaddedIdentity(nn.Module):
    """Parameter-free shortcut (option A): subsample spatially and zero-pad the new channels.

    The zero channels before and after the input's are attributes, so that compaction can resize them.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_before, self.pad_after = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _downsample(in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> nn.Module | None:
    """The shortcut for a block that changes shape (None when it keeps it)."""
    if stride == 1 and in_planes == planes:
        return None
    if shortcut == "identity":
        return PaddedIdentity(in_planes, planes, stride)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """3x3 stem, stages `layer1..` of basic blocks (stride 2 from the second stage), global average pool, `fc`."""

    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Shortcut = "projection",
    ) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise PrunekitError(f"unknown shortcut {shortcut!r}; use one of {', '.join(SHORTCUTS)}")
        self.input_shape = (in_channels, 32, 32)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.stage_names = [f"layer{index + 1}" for index in range(len(widths))]
        in_planes = widths[0]
        for index, (name, blocks, planes) in enumerate(zip(self.stage_names, blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride, shortcut)]
            stage += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
            self.add_module(name, nn.Sequential(*stage))
            in_planes = planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "projection"
) -> CifarResNet:
    """He et al.'s CIFAR ResNet of the given depth (6n + 2): 16-32-64 channels, n blocks per stage."""
    if depth < 8 or (depth - 2) % 6:
        raise PrunekitError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_channels, shortcut)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "projection") -> CifarResNet:
    """ResNet-18 adapted to 32x32 images: 3x3 stem, no max-pool, stages of 64-128-256-512 channels."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, shortcut)
