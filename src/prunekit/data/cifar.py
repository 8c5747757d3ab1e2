"""CIFAR-10/100 in the official binary format, from the extracted folder or straight from the tarball."""
from __future__ import annotations

import functools
import lzma
import tarfile
import zlib
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
    split_from_arrays,
)
from .splits import TensorSplit

IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32
Arrays = tuple[np.ndarray, np.ndarray]  # images, labels


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folders: tuple[str, ...]  # searched under the data directory, before the directory itself
    member_dir: str  # the folder the tarball unpacks to
    archive_prefix: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int
    num_classes: int
    url: str
    md5: str

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files

    @property
    def record_size(self) -> int:
        return self.label_bytes + IMAGE_BYTES

    def search_dirs(self, data_dir: Path) -> tuple[Path, ...]:
        return (*(data_dir / folder for folder in self.folders), data_dir)

    def remote_files(self) -> tuple[RemoteFile, ...]:
        archive = self.url.rsplit("/", 1)[1]
        return (RemoteFile(self.url, f"{self.folders[0]}/{archive}", self.md5),)


CIFAR10 = CifarSpec(
    name="CIFAR-10",
    folders=("CIFAR10", "cifar10"),
    member_dir="cifar-10-batches-bin",
    archive_prefix="cifar-10-binary.tar",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_bytes=1,
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
)
CIFAR100 = CifarSpec(
    name="CIFAR-100",
    folders=("CIFAR100", "cifar100"),
    member_dir="cifar-100-binary",
    archive_prefix="cifar-100-binary.tar",
    train_files=("train.bin",),
    test_files=("test.bin",),
    label_bytes=2,  # coarse label, then fine label
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
)


def read_cifar_dataset(spec: CifarSpec, data_dir: Path) -> tuple[TensorSplit, TensorSplit]:
    source = _locate(spec, data_dir)
    is_archive = source.is_file()
    files = (source,) if is_archive else tuple(source / name for name in spec.files)
    train, test = _read_source(spec, is_archive, file_stamps(files))
    return split_from_arrays(*train), split_from_arrays(*test)


def decode_records(data: bytes, spec: CifarSpec, source: str | Path) -> Arrays:
    """Split fixed-size records into images (N×3×32×32: R, G, B planes) and their (fine) labels."""
    if not data or len(data) % spec.record_size:
        raise corrupt_file_error(
            source, f"{len(data)} bytes is not a positive multiple of the {spec.record_size}-byte record"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, spec.record_size)
    # The fine label is the last label byte in both formats.
    labels = records[:, spec.label_bytes - 1].astype(np.int64)
    if labels.max() >= spec.num_classes:
        raise corrupt_file_error(source, f"label {labels.max()} is outside 0..{spec.num_classes - 1}")
    return records[:, spec.label_bytes :].reshape(-1, *IMAGE_SHAPE), labels


def _locate(spec: CifarSpec, data_dir: Path) -> Path:
    """The extracted folder if complete, else a tarball, searching each candidate directory in turn."""
    incomplete: list[str] = []
    for directory in spec.search_dirs(data_dir):
        folder = directory / spec.member_dir
        missing = [name for name in spec.files if not (folder / name).is_file()]
        if not missing:
            return folder
        if folder.is_dir():
            incomplete.append(f"{folder} lacks {', '.join(missing)}")
        archives = sorted(path for path in directory.glob(f"{spec.archive_prefix}*") if path.is_file())
        if archives:
            return archives[0]
    searched = ", ".join(str(directory) for directory in spec.search_dirs(data_dir))
    raise PrunekitError(
        f"{spec.name} files not found: expected the folder {spec.member_dir}/ "
        f"({', '.join(spec.files)}) or a tarball {spec.archive_prefix}* in any of {searched}"
        + "".join(f"; {note}" for note in incomplete)
        + "; "
        + DATA_DIR_HINT.format(folder=spec.folders[0])
    )


# A second load of the same unchanged files is instant; decompressing the xz tarball takes seconds.
@functools.lru_cache(maxsize=4)
def _read_source(
    spec: CifarSpec, is_archive: bool, stamps: tuple[FileStamp, ...]
) -> tuple[Arrays, Arrays]:
    paths = [Path(stamp[0]) for stamp in stamps]
    if is_archive:
        blobs = _read_archive(spec, paths[0])
        origins = {name: f"{paths[0]} (member {spec.member_dir}/{name})" for name in spec.files}
    else:
        blobs = {path.name: path.read_bytes() for path in paths}
        origins = {path.name: str(path) for path in paths}
    return tuple(
        _concatenate([decode_records(blobs[name], spec, origins[name]) for name in names])
        for names in (spec.train_files, spec.test_files)
    )


def _concatenate(parts: list[Arrays]) -> Arrays:
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def _read_archive(spec: CifarSpec, path: Path) -> dict[str, bytes]:
    """Read the wanted members into memory in one streaming pass; nothing is written to disk."""
    wanted = {f"{spec.member_dir}/{name}": name for name in spec.files}
    blobs: dict[str, bytes] = {}
    with path.open("rb") as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    name = wanted.get(member.name.removeprefix("./"))
                    if name and member.isfile():
                        blobs[name] = archive.extractfile(member).read()
                        if len(blobs) == len(wanted):
                            break
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
            raise corrupt_file_error(path, f"it could not be read as a tar archive ({exc})") from exc
    missing = [member for member, name in wanted.items() if name not in blobs]
    if missing:
        raise corrupt_file_error(path, f"it lacks {', '.join(missing)}")
    return blobs
