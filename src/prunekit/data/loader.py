"""Batches from an in-memory split: one gather per batch, conversion and augmentation in torch."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.hparams import integer, require

from .augment import crop_and_flip, draw_crop_and_flip
from .splits import TensorSplit

if TYPE_CHECKING:
    from .catalog import Dataset


@dataclass
class _EpochPlan:
    order: torch.Tensor
    shifts: torch.Tensor | None
    flips: torch.Tensor | None


class EpochBatches:
    """Batches of `size` examples in an order drawn once per epoch from a generator seeded by (seed, epoch),
    so the same (seed, epoch) gives the same batches. Each iteration uses the current epoch and then
    advances it; `set_epoch` sets the epoch the next iteration uses; `len()` is batches per epoch."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool) -> None:
        require(batch_size, integer(1), "batch_size")
        require(seed, integer(0), "seed")
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        require(epoch, integer(0), "epoch")
        self._epoch = epoch

    def __len__(self) -> int:
        full, remainder = divmod(self.size, self.batch_size)
        return full + (0 if self.drop_last or not remainder else 1)

    def _draw(self) -> tuple[torch.Tensor, torch.Generator]:
        """This iteration's order, and its generator for further draws (augmentation); the epoch advances."""
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self._epoch))
        self._epoch += 1
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        return order, generator

    def _positions(self) -> Iterator[slice]:
        return (slice(start, start + self.batch_size) for start in range(0, len(self) * self.batch_size,
                                                                          self.batch_size))


class Loader(EpochBatches):
    """Yields (x, y): x float32 N×C×H×W normalised as (pixels/255 - mean)/std, y int64.

    Shuffling and augmentation are drawn once per epoch from a generator seeded by (seed, epoch),
    so the same (seed, epoch) gives bit-identical batches. Each iteration uses the current epoch
    and then advances it; `set_epoch` sets the epoch the next iteration uses.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(len(split), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.split = split
        self.augment = augment
        self.device = torch.device(device)
        # The whole uint8 split moves once, so that per-batch gathers happen on the device.
        self._images = split.images.to(self.device)
        self._labels = split.labels.to(self.device)
        self._mean, self._std = _normalisation(mean, std, split.images.shape[1], self.device)

    @classmethod
    def for_dataset(
        cls,
        dataset: Dataset,
        split: str = "train",
        batch_size: int = 128,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs,
    ) -> Loader:
        """A loader with the dataset's normalisation (unless overridden); train shuffles and augments."""
        if split not in ("train", "test"):
            raise PrunekitError(f"split must be 'train' or 'test', got {split!r}")
        is_train = split == "train"
        kwargs.setdefault("shuffle", is_train)
        kwargs.setdefault("augment", is_train and dataset.augment)
        return cls(
            getattr(dataset, split),
            batch_size,
            mean=dataset.mean if mean is None else mean,
            std=dataset.std if std is None else std,
            **kwargs,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, generator = self._draw()
        if not self.augment:
            return self._batches(_EpochPlan(order.to(self.device), None, None))
        shifts, flips = draw_crop_and_flip(len(order), generator)
        return self._batches(_EpochPlan(order.to(self.device), shifts.to(self.device), flips.to(self.device)))

    def _batches(self, plan: _EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for positions in self._positions():
            index = plan.order[positions]
            pixels = self._images[index]
            if plan.shifts is not None:
                pixels = crop_and_flip(pixels, plan.shifts[positions], plan.flips[positions])
            yield self._normalise(pixels), self._labels[index]

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div_(255).sub_(self._mean).div_(self._std)


def _mix_seed(seed: int, epoch: int) -> int:
    # SeedSequence decorrelates nearby (seed, epoch) pairs, unlike e.g. seed + epoch.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def _normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if (mean is None) != (std is None):
        raise PrunekitError("pass both mean and std, or neither (pixels are then only scaled to [0, 1])")
    mean = (0.0,) * channels if mean is None else tuple(mean)
    std = (1.0,) * channels if std is None else tuple(std)
    if len(mean) != channels or len(std) != channels:
        raise PrunekitError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}; "
            "use the data set's own statistics"
        )
    if min(std) <= 0:
        raise PrunekitError(f"std values must be positive, got {std}")
    return _per_channel(mean, device), _per_channel(std, device)


def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

