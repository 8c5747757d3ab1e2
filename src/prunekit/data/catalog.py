"""The named data sets, where their files are looked for, and how they load."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

from ._common import RemoteFile
from .builtin import read_digits, synthetic_splits
from .cifar import CIFAR10, CIFAR100, CifarSpec, read_cifar_dataset
from .idx import FASHION_MNIST, MNIST, IdxSpec, read_idx_dataset
from .splits import TensorSplit
from .text import TextDataset, read_kjv

DATA_DIR_ENV = "PRUNEKIT_DATA"

Splits = tuple[TensorSplit, TensorSplit]
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std


@dataclass
class Dataset:
    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    augment: bool  # whether training should use random crop + horizontal flip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int  # 0 for text, which has no classes
    read: Callable[[Path | None], Splits]  # given the data directory when `needs_files`, else None
    needs_files: bool
    stats: Stats | None = None  # None: computed from the train split
    augment: bool = False
    remote_files: tuple[RemoteFile, ...] = ()
    text: bool = False  # `read` gives TextSplits, loaded as a TextDataset (batches need a model's tokenizer)


def _idx(name: str, spec: IdxSpec, stats: Stats) -> DatasetSpec:
    return DatasetSpec(
        name, 10, functools.partial(read_idx_dataset, spec), needs_files=True,
        stats=stats, remote_files=spec.remote_files(),
    )


def _cifar(name: str, spec: CifarSpec, stats: Stats) -> DatasetSpec:
    return DatasetSpec(
        name, spec.num_classes, functools.partial(read_cifar_dataset, spec), needs_files=True,
        stats=stats, augment=True, remote_files=spec.remote_files(),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": _idx("mnist", MNIST, ((0.1307,), (0.3081,))),
    "fashion-mnist": _idx("fashion-mnist", FASHION_MNIST, ((0.2860,), (0.3530,))),
    "cifar10": _cifar("cifar10", CIFAR10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": _cifar("cifar100", CIFAR100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "digits": DatasetSpec("digits", 10, lambda _: read_digits(), needs_files=False),
    "synthetic": DatasetSpec("synthetic", 10, lambda _: synthetic_splits(), needs_files=False),
    "kjv": DatasetSpec("kjv", 0, read_kjv, needs_files=True, text=True),
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    spec = DATASETS.get(name.strip().lower())
    if spec is None:
        raise PrunekitError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    return spec


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The given directory, else $PRUNEKIT_DATA; it is not required to exist yet."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise PrunekitError(
            f"no data directory: pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, "
            "DIR being the folder that contains MNIST/, FashionMNIST/, CIFAR10/, CIFAR100/ or KJV/"
        )
    return Path(chosen).expanduser()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Dataset | TextDataset:
    """Load a data set into memory; train_size/test_size keep a fixed random subset (seed 0)."""
    spec = get_spec(name)
    train, test = spec.read(_existing_data_dir(data_dir) if spec.needs_files else None)
    if spec.text:
        return TextDataset(spec.name, _limit(train, train_size, "train_size"), _limit(test, test_size, "test_size"))
    for split_name, split in (("train", train), ("test", test)):
        _check_labels(spec, split_name, split)
    mean, std = spec.stats or channel_stats(train)
    return Dataset(
        name=spec.name,
        train=_limit(train, train_size, "train_size"),
        test=_limit(test, test_size, "test_size"),
        num_classes=spec.num_classes,
        mean=mean,
        std=std,
        augment=spec.augment,
    )


def channel_stats(split: TensorSplit) -> Stats:
    """Per-channel mean and (population) std of the pixels scaled to [0, 1]."""
    # From per-channel histograms of the uint8 values: exact, and no float copy of the whole split.
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(split.images.shape[1]):
        counts = torch.bincount(split.images[:, channel].flatten(), minlength=256).to(torch.float64)
        mean = float((counts * levels).sum() / counts.sum())
        means.append(mean)
        stds.append(float(((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt()))
    return tuple(means), tuple(stds)


def _existing_data_dir(data_dir: str | Path | None) -> Path:
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise PrunekitError(
            f"data directory {directory} does not exist or is not a folder; pass --data-dir or set "
            f"{DATA_DIR_ENV} to the folder that contains MNIST/, FashionMNIST/, CIFAR10/, CIFAR100/ or KJV/"
        )
    return directory


def _check_labels(spec: DatasetSpec, split_name: str, split: TensorSplit) -> None:
    if len(split) and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < spec.num_classes:
        raise PrunekitError(
            f"{spec.name} {split_name} labels span {int(split.labels.min())}..{int(split.labels.max())}, "
            f"outside 0..{spec.num_classes - 1}: the files are not {spec.name}; download them again"
        )


def _limit(split: TensorSplit, size: int | None, option: str) -> TensorSplit:
    if size is None or size == len(split):
        return split
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(split):
        raise PrunekitError(f"{option} must be an integer in [1, {len(split)}], got {size!r}")
    return split.take(size, seed=0)
