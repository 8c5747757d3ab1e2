"""Shared fixtures: small models, and real-data locations that must exist under CI."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def skip_or_fail(reason: str) -> None:
    """Real data or checkpoints are absent: skip with the reason, but under CI that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true requires the real data and checkpoints)")
    pytest.skip(reason)


def require_path(path: Path | None, hint: str) -> Path:
    if path is None or not path.exists():
        skip_or_fail(f"{path} not found: {hint}")
    return path


@pytest.fixture
def data_dir() -> Path:
    value = os.environ.get("PRUNEKIT_DATA")
    return require_path(Path(value) if value else None,
                        "set PRUNEKIT_DATA to the folder holding MNIST/, FashionMNIST/, CIFAR10/")


@pytest.fixture
def checkpoints_dir() -> Path:
    return require_path(SHARED / "checkpoints" / "woodfisher", "the shared checkpoints live in ../shared/checkpoints")


class TinyNet(nn.Module):
    """Conv (plain and depthwise), BN and Linear: every kind of tensor the core must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.depthwise(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 6, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(4)]
