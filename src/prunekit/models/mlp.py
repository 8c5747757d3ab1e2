"""Fully connected networks for MNIST-sized images: MLPNet (WoodFisher, CHITA) and LeNet-300-100."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Three ReLU-separated linear layers `fc1`..`fc3` on the flattened image."""

    input_shape: tuple[int, int, int] = (1, 28, 28)

    def __init__(
        self,
        hidden: tuple[int, int],
        bias: bool,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        self.input_shape = (in_channels, input_size, input_size)
        self.fc1 = nn.Linear(in_channels * input_size * input_size, hidden[0], bias=bias)
        self.fc2 = nn.Linear(hidden[0], hidden[1], bias=bias)
        self.fc3 = nn.Linear(hidden[1], num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
