"""prunekit.data: file formats, the data set catalogue, splits and the batch loader.

Tests marked by the `mnist`/`cifar10` fixtures read the real files under $PRUNEKIT_DATA; without it
they skip, except on CI (CI=true) where a missing data directory is a failure.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import skip_or_fail
import pytest
import torch

from prunekit.data import (
    DATASETS,
    Dataset,
    Loader,
    TensorSplit,
    channel_stats,
    download,
    list_datasets,
    load_dataset,
    resolve_data_dir,
)
from prunekit.data.augment import crop_and_flip
from prunekit.data.idx import parse_idx
from prunekit.errors import PrunekitError

MNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Published per-class counts of the official MNIST splits.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_CAT = 3


# ---------------------------------------------------------------- real data, fixtures and helpers


@dataclass
class RealData:
    root: Path
    listing_before: dict[str, tuple[int, int]]


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in [root, *root.rglob("*")]
    }


@pytest.fixture(scope="module")
def real_data() -> RealData:
    value = os.environ.get("PRUNEKIT_DATA")
    if not value or not Path(value).is_dir():
        skip_or_fail(f"PRUNEKIT_DATA is {value!r}: set it to the folder holding MNIST/ and CIFAR10/")
    root = Path(value)
    return RealData(root, _listing(root))


def _real_subfolder(real_data: RealData, name: str) -> Path:
    folder = real_data.root / name
    if not folder.is_dir():
        skip_or_fail(f"{folder} is missing")
    return folder


@pytest.fixture(scope="module")
def mnist(real_data: RealData) -> Dataset:
    _real_subfolder(real_data, "MNIST")
    return load_dataset("mnist", real_data.root)


@pytest.fixture(scope="module")
def cifar10(real_data: RealData) -> Dataset:
    # Decompressing the xz tarball takes several seconds: once per session.
    _real_subfolder(real_data, "CIFAR10")
    return load_dataset("cifar10", real_data.root)


def ids_split(size: int, image_shape: tuple[int, ...] = (1, 2, 2)) -> TensorSplit:
    """Labels are the example ids, so batches show exactly which examples they hold."""
    generator = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (size, *image_shape), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(size))


SHIFTS_AND_FLIPS = [(dy, dx, flip) for dy in range(-4, 5) for dx in range(-4, 5) for flip in (False, True)]


def reference_crop_and_flip(
    images: torch.Tensor, dy: int, dx: int, flip: bool, padding: int = 4
) -> torch.Tensor:
    """torchvision's RandomCrop(padding=4) + flip with one shift for all images, the obvious slicing way."""
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    crop = padded[..., padding + dy : padding + dy + height, padding + dx : padding + dx + width]
    return crop.flip(-1) if flip else crop


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def cifar_records(images: torch.Tensor, labels: torch.Tensor, coarse_label: int | None = None) -> bytes:
    """Serialise to the official binary format: [coarse label (CIFAR-100)], label, R, G, B planes."""
    columns = [labels.numpy().astype(np.uint8)[:, None], images.reshape(len(images), -1).numpy()]
    if coarse_label is not None:
        columns.insert(0, np.full((len(labels), 1), coarse_label, np.uint8))
    return np.concatenate(columns, axis=1).tobytes()


# ---------------------------------------------------------------- TensorSplit


def test_tensor_split_validates_dtypes_and_lengths() -> None:
    with pytest.raises(PrunekitError, match="uint8"):
        TensorSplit(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(PrunekitError, match="int64"):
        TensorSplit(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(PrunekitError, match="2 images but 3 labels"):
        TensorSplit(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PrunekitError, match=r"\[0, 5\)"):
        ids_split(5).subset([0, 5])


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = ids_split(100)
    rest, held = data.split(holdout=20, seed=1)
    assert (len(rest), len(held)) == (80, 20)
    assert sorted(rest.labels.tolist() + held.labels.tolist()) == list(range(100))
    assert torch.equal(held.images, data.images[held.labels])
    assert torch.equal(data.split(20, seed=1)[1].labels, held.labels)
    assert not torch.equal(data.split(20, seed=2)[1].labels, held.labels)
    with pytest.raises(PrunekitError, match="holdout"):
        data.split(holdout=100, seed=0)


def test_take_is_a_seeded_subset() -> None:
    data = ids_split(50)
    taken = data.take(10, seed=4)
    assert len(set(taken.labels.tolist())) == 10
    assert torch.equal(data.take(10, seed=4).labels, taken.labels)
    assert not torch.equal(data.take(10, seed=5).labels, taken.labels)
    with pytest.raises(PrunekitError, match=r"\[1, 50\]"):
        data.take(51, seed=0)


# ---------------------------------------------------------------- catalogue


def test_resolve_data_dir_prefers_flag_then_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("PRUNEKIT_DATA")
    with pytest.raises(PrunekitError, match="--data-dir.*PRUNEKIT_DATA"):
        resolve_data_dir(None)


def test_unknown_name_lists_the_known_ones() -> None:
    assert list_datasets() == list(DATASETS)
    with pytest.raises(PrunekitError, match="mnist, fashion-mnist, cifar10, cifar100, digits, synthetic"):
        load_dataset("imagenet")


def test_missing_data_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="does not exist.*PRUNEKIT_DATA"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_digits_loads_offline_scaled_to_bytes() -> None:
    digits = load_dataset("digits")
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.input_shape == (1, 8, 8)
    assert digits.train.images.dtype == torch.uint8
    assert {int(digits.train.images.min()), int(digits.train.images.max())} == {0, 255}
    assert set(digits.train.labels.tolist()) == set(range(10))
    assert digits.mean == pytest.approx(channel_stats(digits.train)[0])
    assert torch.equal(load_dataset("digits").test.images, digits.test.images)
    smaller = load_dataset("digits", train_size=100)
    assert len(smaller.train) == 100 and smaller.mean == digits.mean
    with pytest.raises(PrunekitError, match="train_size"):
        load_dataset("digits", train_size=2000)


def test_synthetic_is_deterministic_and_learnable() -> None:
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    assert torch.equal(load_dataset("synthetic").train.images, data.train.images)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = Loader.for_dataset(data, "train", 64)
    for _ in range(2):
        for x, y in train:
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in Loader.for_dataset(data, "test", 500))
    assert correct / len(data.test) > 0.9


# ---------------------------------------------------------------- IDX / MNIST


def test_parse_idx_checks_magic_and_size() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array), "x"), array)
    with pytest.raises(PrunekitError, match="magic number"):
        parse_idx(b"\x00\x00\x0d\x01" + bytes(8), "floats")
    with pytest.raises(PrunekitError, match="truncated or corrupt.*28 bytes where.*implies 40"):
        parse_idx(idx_bytes(array)[:-12], "short")
    with pytest.raises(PrunekitError, match="implies 40"):
        parse_idx(idx_bytes(array) + b"\x00", "long")


def test_mnist_matches_the_published_files(mnist: Dataset) -> None:
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.bincount(mnist.train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.labels).tolist() == MNIST_TEST_COUNTS
    assert (mnist.mean, mnist.std, mnist.augment) == ((0.1307,), (0.3081,), False)


def test_uncompressed_mnist_loads_identically(mnist: Dataset, real_data: RealData, tmp_path: Path) -> None:
    folder = tmp_path / "MNIST"
    folder.mkdir()
    for stem in MNIST_STEMS:
        compressed = (real_data.root / "MNIST/raw" / f"{stem}.gz").read_bytes()
        (folder / stem).write_bytes(gzip.decompress(compressed))
    for data_dir in (tmp_path, folder):  # <dir>/MNIST/ and the files directly in <dir>
        plain = load_dataset("mnist", data_dir)
        assert torch.equal(plain.train.images, mnist.train.images)
        assert torch.equal(plain.test.labels, mnist.test.labels)


def test_truncated_mnist_file_is_named(real_data: RealData, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in MNIST_STEMS:
        shutil.copy(real_data.root / "MNIST/raw" / f"{stem}.gz", raw)
    broken = raw / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:2000])
    with pytest.raises(PrunekitError, match=r"t10k-labels-idx1-ubyte\.gz is truncated or corrupt.*download it again"):
        load_dataset("mnist", tmp_path)
    broken.unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(10000, np.uint8))[:5000])
    with pytest.raises(PrunekitError, match=r"t10k-labels-idx1-ubyte is truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_missing_mnist_files_are_listed(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError) as empty:
        load_dataset("mnist", tmp_path)
    assert all(stem in str(empty.value) for stem in MNIST_STEMS)
    assert "PRUNEKIT_DATA" in str(empty.value) and "MNIST/" in str(empty.value)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in MNIST_STEMS[:2]:
        (raw / f"{stem}.gz").write_bytes(b"")
    missing_test_files = f"missing t10k-images-idx3-ubyte.*t10k-labels-idx1-ubyte.* in {re.escape(str(raw))}"
    with pytest.raises(PrunekitError, match=missing_test_files) as partial:
        load_dataset("mnist", tmp_path)
    assert "train-images" not in str(partial.value)


def test_fashion_mnist_statistics_match(real_data: RealData) -> None:
    _real_subfolder(real_data, "FashionMNIST")
    fashion = load_dataset("fashion-mnist", real_data.root)
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    mean, std = channel_stats(fashion.train)
    assert mean == pytest.approx(fashion.mean, abs=1e-3) and std == pytest.approx(fashion.std, abs=1e-3)


# ---------------------------------------------------------------- CIFAR


def test_cifar10_from_the_tarball(cifar10: Dataset) -> None:
    assert (len(cifar10.train), len(cifar10.test)) == (50000, 10000)
    assert cifar10.input_shape == (3, 32, 32) and cifar10.augment
    assert int(cifar10.test.labels[0]) == CIFAR_CAT
    assert torch.bincount(cifar10.train.labels).tolist() == [5000] * 10
    assert torch.bincount(cifar10.test.labels).tolist() == [1000] * 10
    # The published per-channel statistics only come out if the R, G, B planes are decoded right.
    mean, std = channel_stats(cifar10.train)
    assert mean == pytest.approx(cifar10.mean, abs=1e-3) and std == pytest.approx(cifar10.std, abs=1e-3)


def same_memory(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


@pytest.mark.parametrize(("name", "reader"), [
    ("mnist", "prunekit.data.idx.read_maybe_gzipped"),
    ("cifar10", "tarfile.open"),
])
def test_a_second_load_is_cached_and_private(
    name: str, reader: str, real_data: RealData, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    request.getfixturevalue(name)  # the files have been read once

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the files were read again")

    monkeypatch.setattr(reader, no_reading)
    first, second = load_dataset(name, real_data.root), load_dataset(name, real_data.root)
    originals = {split: (getattr(second, split).images.clone(), getattr(second, split).labels.clone())
                 for split in ("train", "test")}
    for split in ("train", "test"):
        mine, theirs = getattr(first, split), getattr(second, split)
        for tensor, other in ((mine.images, theirs.images), (mine.labels, theirs.labels)):
            assert not same_memory(tensor, other)
            tensor.zero_()
    third = load_dataset(name, real_data.root)
    for split, (images, labels) in originals.items():
        assert torch.equal(getattr(third, split).images, images) and torch.equal(getattr(third, split).labels, labels)
        assert torch.equal(getattr(second, split).images, images) and images.any()


def test_cifar10_folder_matches_tarball(cifar10: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(cifar_records(cifar10.test.images, cifar10.test.labels))
    for batch in range(1, 6):
        fake = cifar10.train.subset([batch, 100 + batch])
        (folder / f"data_batch_{batch}.bin").write_bytes(cifar_records(fake.images, fake.labels))
    from_folder = load_dataset("cifar10", tmp_path)
    assert torch.equal(from_folder.test.images, cifar10.test.images)
    assert torch.equal(from_folder.test.labels, cifar10.test.labels)
    written_order = [index for batch in range(1, 6) for index in (batch, 100 + batch)]
    assert torch.equal(from_folder.train.images, cifar10.train.subset(written_order).images)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_cifar100_tarball_uses_fine_labels(tmp_path: Path, compression: str) -> None:
    split = ids_split(6, (3, 32, 32))
    fine = torch.tensor([0, 99, 5, 42, 7, 63])
    records = {
        "train.bin": cifar_records(split.images, fine, coarse_label=17),
        "test.bin": cifar_records(split.images[:2], fine[:2], coarse_label=17),
    }
    (tmp_path / "CIFAR100").mkdir()
    archive_path = tmp_path / "CIFAR100" / f"cifar-100-binary.tar.{compression}"
    with tarfile.open(archive_path, f"w:{compression}") as archive:
        for name, data in records.items():
            member = tarfile.TarInfo(f"cifar-100-binary/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    cifar100 = load_dataset("cifar100", tmp_path)
    assert cifar100.train.labels.tolist() == fine.tolist()
    assert torch.equal(cifar100.train.images, split.images)
    assert cifar100.num_classes == 100 and len(cifar100.test) == 2


def test_truncated_cifar_tarball_is_named(tmp_path: Path) -> None:
    payload = cifar_records(ids_split(20, (3, 32, 32)).images, torch.zeros(20, dtype=torch.long))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PrunekitError, match=r"cifar-10-binary\.tar\.gz is truncated or corrupt.*download it again"):
        load_dataset("cifar10", tmp_path)


def test_missing_or_broken_cifar_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match=r"cifar-10-batches-bin/.*cifar-10-binary\.tar\*.*PRUNEKIT_DATA.*CIFAR10/"):
        load_dataset("cifar10", tmp_path)
    folder = tmp_path / "CIFAR10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in ["data_batch_1.bin", "test_batch.bin"]:
        (folder / name).write_bytes(bytes(3073 * 2 + 5))
    lacking = f"{folder} lacks data_batch_2.bin, data_batch_3.bin, data_batch_4.bin, data_batch_5.bin"
    with pytest.raises(PrunekitError, match=re.escape(lacking)):
        load_dataset("cifar10", tmp_path)
    for batch in range(2, 6):
        (folder / f"data_batch_{batch}.bin").write_bytes(bytes(3073))
    with pytest.raises(PrunekitError, match=r"data_batch_1\.bin is truncated or corrupt.*3073-byte record"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- augmentation


def test_crop_and_flip_matches_the_reference_for_every_shift() -> None:
    images = ids_split(4, (3, 6, 7)).images
    for dy, dx, flip in SHIFTS_AND_FLIPS:
        out = crop_and_flip(images, torch.tensor([[dy, dx]] * 4), torch.tensor([flip] * 4))
        assert torch.equal(out, reference_crop_and_flip(images, dy, dx, flip))
    unchanged = crop_and_flip(images, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(unchanged, images)


def test_loader_augmentation_gives_valid_varied_crops() -> None:
    data = ids_split(400, (3, 8, 8))
    variants = torch.stack([reference_crop_and_flip(data.images, *choice) for choice in SHIFTS_AND_FLIPS], 1)
    seen: list[tuple[int, int, bool]] = []
    for x, ids in Loader(data, 64, shuffle=True, augment=True):
        assert x.shape[1:] == (3, 8, 8)
        pixels = torch.round(x * 255).to(torch.uint8)
        matches = (variants[ids] == pixels[:, None]).flatten(2).all(dim=2)
        assert matches.any(dim=1).all(), "an output is not a crop/flip of its original"
        seen += [SHIFTS_AND_FLIPS[int(choice)] for choice in matches.float().argmax(dim=1)]
    flipped = sum(flip for _, _, flip in seen) / len(seen)
    assert 0.4 < flipped < 0.6
    assert len({(dy, dx) for dy, dx, _ in seen}) > 60  # of the 81 possible shifts


# ---------------------------------------------------------------- loader


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_loader_standardises_with_the_dataset_statistics(name: str, request: pytest.FixtureRequest) -> None:
    dataset: Dataset = request.getfixturevalue(name)
    first, _ = next(iter(Loader.for_dataset(dataset, "train", 2000, shuffle=False, augment=False)))
    assert first.dtype == torch.float32 and first.shape == (2000, *dataset.input_shape)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in (dataset.mean, dataset.std))
    assert torch.allclose(first.double(), (dataset.train.images[:2000] / 255 - mean) / std, atol=1e-5)
    big, _ = next(iter(Loader.for_dataset(dataset, "train", 10000, shuffle=True, augment=False)))
    assert big.mean(dim=(0, 2, 3)).abs().max() < 0.03
    assert (big.std(dim=(0, 2, 3)) - 1).abs().max() < 0.03


def test_same_seed_and_epoch_give_identical_batches() -> None:
    data = ids_split(1000, (3, 32, 32))

    def epoch_batches(loader: Loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.clone(), y.clone()) for x, y in loader]

    def same(first: list, second: list) -> bool:
        return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))

    def make() -> Loader:
        return Loader(data, 128, shuffle=True, augment=True, seed=3)

    resumed = make()
    resumed.set_epoch(2)
    automatic = make()
    epochs = [epoch_batches(automatic) for _ in range(3)]  # epochs 0, 1, 2 without set_epoch
    assert automatic.epoch == 3
    assert same(epoch_batches(resumed), epochs[2])
    assert not same(epochs[1], epochs[2])
    assert not same(epoch_batches(Loader(data, 128, shuffle=True, augment=True, seed=4)), epochs[0])


def test_shuffled_epoch_covers_every_example_once() -> None:
    data = ids_split(103)
    loader = Loader(data, 10, shuffle=True)
    ids = [y for _, y in loader]
    assert len(loader) == len(ids) == 11 and len(ids[-1]) == 3
    order = torch.cat(ids)
    assert sorted(order.tolist()) == list(range(103)) and order.tolist() != list(range(103))
    dropping = Loader(data, 10, shuffle=True, drop_last=True)
    kept = [y for _, y in dropping]
    assert len(dropping) == len(kept) == 10 and all(len(y) == 10 for y in kept)
    assert len(set(torch.cat(kept).tolist())) == 100
    assert torch.cat([y for _, y in Loader(data, 10)]).tolist() == list(range(103))


def test_for_dataset_picks_dataset_settings_unless_overridden() -> None:
    synthetic = load_dataset("synthetic")
    cifar_like = Dataset(
        "fake", ids_split(8, (3, 32, 32)), ids_split(4, (3, 32, 32)), 10, (0.5,) * 3, (0.25,) * 3, augment=True
    )
    train = Loader.for_dataset(cifar_like, "train", 4)
    assert train.shuffle and train.augment
    test = Loader.for_dataset(cifar_like, "test", 4)
    assert not test.shuffle and not test.augment
    x, _ = next(iter(test))
    assert torch.allclose(x, (cifar_like.test.images.float() / 255 - 0.5) / 0.25)
    overridden = Loader.for_dataset(synthetic, "test", 4, mean=(0.0,), std=(1.0,))
    assert torch.allclose(next(iter(overridden))[0], synthetic.test.images[:4].float() / 255)
    assert not Loader.for_dataset(synthetic, "train", 4).augment
    with pytest.raises(PrunekitError, match="'train' or 'test'"):
        Loader.for_dataset(synthetic, "validation", 4)


def test_loader_rejects_bad_arguments() -> None:
    data = ids_split(10, (3, 4, 4))
    with pytest.raises(PrunekitError, match="batch_size"):
        Loader(data, 0)
    with pytest.raises(PrunekitError, match="both mean and std"):
        Loader(data, 2, mean=(0.5, 0.5, 0.5))
    with pytest.raises(PrunekitError, match="one value per channel"):
        Loader(data, 2, mean=(0.5,), std=(0.2,))
    with pytest.raises(PrunekitError, match="epoch"):
        Loader(data, 2).set_epoch(-1)


# ---------------------------------------------------------------- download (offline) and the data directory


def test_download_rejects_a_wrong_checksum_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"not the real file"))
    with pytest.raises(PrunekitError, match="expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download("mnist", tmp_path)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
    with pytest.raises(PrunekitError, match="needs no files"):
        download("digits", tmp_path)


def test_loading_leaves_the_data_directory_untouched(
    real_data: RealData, mnist: Dataset, cifar10: Dataset
) -> None:
    assert _listing(real_data.root) == real_data.listing_before
