"""LeNet-5 for 32x32 colour (CIFAR) or 28x28 grey (MNIST) images."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from prunekit.errors import PrunekitError


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, classes.

    `input_size` defaults to 28 for one input channel (MNIST) and 32 otherwise (CIFAR);
    the first fully connected layer is sized for it, so images are never padded.
    """

    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int | None = None) -> None:
        super().__init__()
        input_size = input_size or (28 if in_channels == 1 else 32)
        side = ((input_size - 4) // 2 - 4) // 2  # two valid 5x5 convolutions, each followed by a 2x2 pool
        if side < 1:
            raise PrunekitError(f"lenet5 needs images of at least 16x16 pixels, got input_size={input_size}")
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
