"""Fetch the official files into the data directory, checked against their published md5."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.io import atomic_path

from ._common import RemoteFile
from .catalog import get_spec, resolve_data_dir

CHUNK_BYTES = 1 << 20


def download(name: str, data_dir: str | Path | None = None) -> Path:
    """Download what `name` needs (skipping files already present and intact); returns the data directory."""
    spec = get_spec(name)
    if not spec.needs_files:
        raise PrunekitError(f"{spec.name} needs no files: it loads offline with no download")
    root = resolve_data_dir(data_dir)
    for remote in spec.remote_files:
        target = root / remote.destination
        if not (target.is_file() and _md5(target) == remote.md5):
            _fetch(remote, target)
    return root


def _fetch(remote: RemoteFile, target: Path) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with atomic_path(target) as partial, urllib.request.urlopen(remote.url, timeout=60) as response:
            with partial.open("wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != remote.md5:
                raise PrunekitError(
                    f"{remote.url} arrived with md5 {digest.hexdigest()}, expected {remote.md5}; "
                    f"try again later or place the official file at {target} yourself"
                )
    except (urllib.error.URLError, TimeoutError) as exc:
        raise PrunekitError(
            f"could not download {remote.url} ({exc}); check the network or place the file at {target}"
        ) from exc


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
