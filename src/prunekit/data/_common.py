"""Helpers shared by the file readers: cache keys, decompression and error messages."""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PrunekitError

from .splits import TensorSplit

# (resolved path, mtime in ns, size): a cache key that changes when the file is replaced.
FileStamp = tuple[str, int, int]

DATA_DIR_HINT = "point --data-dir or PRUNEKIT_DATA at the folder containing {folder}/"


@dataclass(frozen=True)
class RemoteFile:
    """An official download: where it comes from, where it goes under the data directory, its md5."""

    url: str
    destination: str
    md5: str


def file_stamps(paths: tuple[Path, ...]) -> tuple[FileStamp, ...]:
    stamps = []
    for path in paths:
        status = path.stat()
        stamps.append((str(path.resolve()), status.st_mtime_ns, status.st_size))
    return tuple(stamps)


def corrupt_file_error(source: str | Path, detail: str) -> PrunekitError:
    return PrunekitError(
        f"{source} is truncated or corrupt: {detail}. Delete it and download it again."
    )


def read_maybe_gzipped(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise corrupt_file_error(path, f"gzip could not decompress it ({exc})") from exc


def split_from_arrays(images: np.ndarray, labels: np.ndarray) -> TensorSplit:
    # Copies, so that a caller writing into its tensors cannot alter the process-wide cache.
    return TensorSplit(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))
