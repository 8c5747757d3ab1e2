"""An in-memory set of labelled images and seeded ways to carve it up."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.hparams import integer, require


@dataclass
class TensorSplit:
    """Images as uint8 N×C×H×W, labels as int64 N.

    Images stay uint8 to save memory (4× less than float); the Loader converts per batch.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise PrunekitError(
                f"images must be a uint8 N×C×H×W tensor, got {self.images.dtype} with shape "
                f"{tuple(self.images.shape)}; pass raw pixels as .to(torch.uint8) with a channel axis"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise PrunekitError(
                f"labels must be an int64 tensor of shape (N,), got {self.labels.dtype} with shape "
                f"{tuple(self.labels.shape)}; convert them with .long() and flatten them"
            )
        if len(self.images) != len(self.labels):
            raise PrunekitError(
                f"{len(self.images)} images but {len(self.labels)} labels; pass one label per image"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TensorSplit:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise PrunekitError(
                f"subset indices must lie in [0, {len(self)}), got values from {int(index.min())} "
                f"to {int(index.max())}; pass positions within this split"
            )
        return TensorSplit(self.images[index], self.labels[index])

    def split(self, holdout: int, seed: int = 0) -> tuple[TensorSplit, TensorSplit]:
        """Randomly hold out `holdout` examples: (rest, held_out), disjoint, each in original order."""
        require(holdout, integer(1, len(self) - 1), "holdout", " for this split")
        order = _permutation(len(self), seed)
        return self.subset(order[holdout:].sort().values), self.subset(order[:holdout].sort().values)

    def take(self, n: int, seed: int = 0) -> TensorSplit:
        """A random subset of `n` examples, in original order."""
        require(n, integer(1, len(self)), "n", " for this split")
        return self.subset(_permutation(len(self), seed)[:n].sort().values)


def _permutation(size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))

