"""MNIST-style data sets: the four IDX files in the torchvision layout, gzipped or not."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunekit.errors import PrunekitError

from ._common import (
    DATA_DIR_HINT,
    FileStamp,
    RemoteFile,
    corrupt_file_error,
    file_stamps,
    read_maybe_gzipped,
    split_from_arrays,
)
from .splits import TensorSplit

IDX_UNSIGNED_BYTE = 0x08
# (images, labels) file stems per split, as published.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_STEMS = tuple(stem for pair in IDX_FILES.values() for stem in pair)


@dataclass(frozen=True)
class IdxSpec:
    folder: str
    base_url: str
    gz_md5: tuple[str, ...]  # of the official .gz files, in ALL_STEMS order

    def search_dirs(self, data_dir: Path) -> tuple[Path, ...]:
        return (data_dir / self.folder / "raw", data_dir / self.folder, data_dir)

    def remote_files(self) -> tuple[RemoteFile, ...]:
        return tuple(
            RemoteFile(f"{self.base_url}{stem}.gz", f"{self.folder}/raw/{stem}.gz", md5)
            for stem, md5 in zip(ALL_STEMS, self.gz_md5)
        )


MNIST = IdxSpec(
    folder="MNIST",
    base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    gz_md5=(
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
)
FASHION_MNIST = IdxSpec(
    folder="FashionMNIST",
    base_url="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    gz_md5=(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
)


def parse_idx(data: bytes, source: str | Path) -> np.ndarray:
    """Decode an IDX file of unsigned bytes: 0x00 0x00 0x08 ndim, ndim big-endian uint32 sizes, the data."""
    if len(data) < 4:
        raise corrupt_file_error(source, f"only {len(data)} bytes, too short for an IDX header")
    if data[:2] != b"\x00\x00" or data[2] != IDX_UNSIGNED_BYTE:
        raise corrupt_file_error(
            source, f"magic number 0x{data[:4].hex()} is not that of an IDX file of unsigned bytes"
        )
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise corrupt_file_error(source, f"only {len(data)} bytes, too short for a {ndim}-d IDX header")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected_size = header_size + math.prod(shape)
    if len(data) != expected_size:
        raise corrupt_file_error(
            source, f"{len(data)} bytes where its header {shape} implies {expected_size}"
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_idx_dataset(spec: IdxSpec, data_dir: Path) -> tuple[TensorSplit, TensorSplit]:
    paths = _locate(spec, data_dir)
    train, test = (
        _read_pair(file_stamps((paths[images], paths[labels])))
        for images, labels in IDX_FILES.values()
    )
    return split_from_arrays(*train), split_from_arrays(*test)


def _locate(spec: IdxSpec, data_dir: Path) -> dict[str, Path]:
    """The first search folder holding all four files; otherwise an error naming what is missing where."""
    best: dict[str, Path] = {}
    best_dir = data_dir
    for folder in spec.search_dirs(data_dir):
        found = {stem: path for stem in ALL_STEMS if (path := _find_file(folder, stem))}
        if len(found) == len(ALL_STEMS):
            return found
        if len(found) > len(best):
            best, best_dir = found, folder
    searched = ", ".join(str(folder) for folder in spec.search_dirs(data_dir))
    wanted = ", ".join(f"{stem}[.gz]" for stem in ALL_STEMS if stem not in best)
    where = f"in {best_dir} (which has the other files)" if best else f"in any of {searched}"
    raise PrunekitError(
        f"{spec.folder} files not found: missing {wanted} {where}; "
        + DATA_DIR_HINT.format(folder=spec.folder)
        + f" (torchvision layout {spec.folder}/raw/*.gz)"
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    # The uncompressed file is preferred: torchvision leaves both, and it reads faster.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def _read_pair(stamps: tuple[FileStamp, FileStamp]) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (Path(stamp[0]) for stamp in stamps)
    images = parse_idx(read_maybe_gzipped(images_path), images_path)
    labels = parse_idx(read_maybe_gzipped(labels_path), labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise PrunekitError(
            f"{images_path} must hold N×H×W images and {labels_path} N labels, got shapes "
            f"{images.shape} and {labels.shape}; check the two files are not swapped"
        )
    if len(images) != len(labels):
        raise PrunekitError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the files come from different downloads: download both again"
        )
    return images[:, None], labels.astype(np.int64)
