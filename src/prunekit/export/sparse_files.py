"""Sparse weight files: safetensors in which each mostly-zero tensor is stored as its nonzero values plus
where they are, and which load back into the dense model bit for bit.

Every tensor gets the smallest of three encodings, by exact byte count:

- `dense`: the tensor itself (biases, batch-norm statistics, anything not sparse enough to gain);
- `bitmask`: one bit per entry (packed, little-endian bit order) + the nonzero values, (1 − s)·e + 1/8 bytes
  per entry for e-byte values: the smaller encoding from about 3% density (s ≈ 0.97 for float32) down;
- `indices`: the flat positions of the nonzero values (int32, int64 past 2³¹ entries) + the values,
  (1 − s)·(e + 4) bytes per entry: smaller than the bitmask only above that sparsity (99% for instance).

"Nonzero" is decided on the bits, so -0.0 and NaN are kept and everything restored is the same bits; positions
left out are all-zero bits. `benchmarks/RESULTS.md` has the sizes measured at 50/90/99%.

A file is recognised by its header's `format`; `checkpoints.read_state_dict` decodes it, so every command that
takes `--checkpoint` reads sparse files too. Nothing is unpickled, and a file whose parts do not agree (a count,
a length, an index out of range) is refused with one line naming the tensor.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import PrunekitError
from ..io import atomic_path
from ..masks import get_masks

SPARSE_FILE_FORMAT = "prunekit-sparse/1"
LAYOUT_KEY = "prunekit_sparse_layout"  # header entry: JSON {tensor name: {encoding, shape, dtype}}
DENSE, BITMASK, INDICES = "dense", "bitmask", "indices"
ENCODINGS = (DENSE, BITMASK, INDICES)
_VALUES, _BITMASK, _INDICES = "::values", "::bitmask", "::indices"  # stored key suffixes; `::` is in no module name
_INT32_POSITIONS = 2**31 - 1


@dataclass(frozen=True)
class SparseFileReport:
    """What `save_sparse` wrote: each tensor's encoding, and the payload bytes against the dense ones."""

    path: Path
    encodings: dict[str, str]
    dense_bytes: int  # the tensors' bytes stored dense
    stored_bytes: int  # the tensors' bytes as encoded (the file adds its JSON header)

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def save_sparse(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                metadata: Mapping[str, Any] | None = None) -> SparseFileReport:
    """Write the model's plain weights (masks folded in) as a sparse safetensors file, atomically."""
    from ..checkpoints import encode_metadata  # checkpoints decodes these files: import late

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PrunekitError(f"a sparse weight file is safetensors; name it *.safetensors, not {path.name}")
    state = _plain_weights(model_or_state) if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        encoding, parts = encode_tensor(tensor.detach().cpu())
        layout[name] = {"encoding": encoding, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        tensors.update({name + suffix: part for suffix, part in parts.items()})
    header = {**encode_metadata(metadata or {}), "format": SPARSE_FILE_FORMAT, LAYOUT_KEY: json.dumps(layout)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return SparseFileReport(path, {name: entry["encoding"] for name, entry in layout.items()},
                            sum(t.numel() * t.element_size() for t in state.values()),
                            sum(t.numel() * t.element_size() for t in tensors.values()))


def _plain_weights(model: nn.Module) -> dict[str, Tensor]:
    """The state dict `make_permanent` would leave (pruned entries +0.0), the model itself untouched.

    Not make_permanent on a deep copy: a copy shares its parametrized classes with the original, and removing
    the copy's parametrizations removes the original's weight properties too.
    """
    from ..checkpoints import plain_state_dict

    state = plain_state_dict(model)
    for name, mask in get_masks(model).items():
        state[name] = state[name].detach().masked_fill(~mask, 0.0)
    return state


def load_sparse(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Copy a sparse file's weights into `model` (checked like any checkpoint); returns the header's metadata."""
    from ..checkpoints import load_state_dict_into, read_state_dict

    state, metadata = read_state_dict(path)
    if metadata.get("format") != SPARSE_FILE_FORMAT:
        raise PrunekitError(f"{path} is not a prunekit sparse weight file (format {metadata.get('format')!r}); "
                            "load a dense checkpoint with prunekit.checkpoints.load_state_dict_into")
    load_state_dict_into(model, state)
    return metadata


def is_sparse_file(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors header is a sparse weight file's."""
    return metadata.get("format") == SPARSE_FILE_FORMAT


# ---------------------------------------------------------------- encoding

def encoded_bytes(tensor: Tensor) -> dict[str, int]:
    """The exact payload bytes of `tensor` under each encoding."""
    entries, size = tensor.numel(), tensor.element_size()
    kept = int(_nonzero_bits(tensor).sum())
    return {DENSE: entries * size, BITMASK: math.ceil(entries / 8) + kept * size,
            INDICES: kept * (_position_dtype(entries).itemsize + size)}


def encode_tensor(tensor: Tensor) -> tuple[str, dict[str, Tensor]]:
    """The smallest encoding of `tensor` and its stored parts by key suffix (ties go to the simpler encoding)."""
    sizes = encoded_bytes(tensor)
    encoding = min(ENCODINGS, key=lambda name: sizes[name])  # ENCODINGS is in order of simplicity
    if encoding == DENSE:
        return DENSE, {"": tensor.contiguous().clone()}  # its own storage, as safetensors requires
    flat = tensor.reshape(-1)
    kept = _nonzero_bits(flat)
    values = flat[kept].clone()
    if encoding == BITMASK:
        packed = np.packbits(kept.numpy(), bitorder="little")
        return BITMASK, {_BITMASK: torch.from_numpy(packed), _VALUES: values}
    positions = kept.nonzero().reshape(-1).to(_position_dtype(flat.numel()))
    return INDICES, {_INDICES: positions, _VALUES: values}


def _nonzero_bits(tensor: Tensor) -> Tensor:
    """Per entry, whether any of its bits is set: -0.0 counts as nonzero, so it comes back as -0.0."""
    flat = tensor.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).reshape(flat.numel(), flat.element_size()).ne(0).any(dim=1)


def _position_dtype(entries: int) -> torch.dtype:
    return torch.int32 if entries <= _INT32_POSITIONS else torch.int64


_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise PrunekitError(f"a sparse weight file holds {', '.join(_DTYPES)} tensors, not {name}; convert it first")
    return name


# ---------------------------------------------------------------- decoding

def decode_sparse(tensors: Mapping[str, Tensor], header: Mapping[str, str],
                  path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The dense state dict a sparse file's stored parts encode, and its header without the layout."""
    layout = _read_layout(header, path)
    state = {name: _decode_entry(name, entry, tensors, path) for name, entry in layout.items()}
    stray = set(tensors) - {name + suffix for name, entry in layout.items() for suffix in _suffixes(entry)}
    if stray:
        _damaged(path, f"it stores tensors its layout does not name ({sorted(stray)[:3]})")
    return state, {key: value for key, value in header.items() if key != LAYOUT_KEY}


def _read_layout(header: Mapping[str, str], path) -> dict[str, dict[str, Any]]:
    try:
        layout = json.loads(header.get(LAYOUT_KEY, ""))
    except ValueError:
        layout = None
    if not isinstance(layout, dict) or not all(isinstance(entry, dict) for entry in layout.values()):
        _damaged(path, f"its header entry {LAYOUT_KEY!r} is missing or not a JSON object of tensors")
    return layout


def _suffixes(entry: Mapping[str, Any]) -> tuple[str, ...]:
    return {DENSE: ("",), BITMASK: (_BITMASK, _VALUES), INDICES: (_INDICES, _VALUES)}.get(entry.get("encoding"), ())


def _decode_entry(name: str, entry: Mapping[str, Any], tensors: Mapping[str, Tensor], path) -> Tensor:
    encoding, shape, dtype = entry.get("encoding"), entry.get("shape"), _DTYPES.get(entry.get("dtype"))
    if encoding not in ENCODINGS or dtype is None or not _is_shape(shape):
        _damaged(path, f"tensor {name} has encoding {encoding!r}, shape {shape!r}, dtype {entry.get('dtype')!r}")
    parts = {}
    for suffix in _suffixes(entry):
        if name + suffix not in tensors:
            _damaged(path, f"tensor {name} ({encoding}) lacks its part {name + suffix!r}")
        parts[suffix] = tensors[name + suffix]
    entries = math.prod(shape)
    if encoding == DENSE:
        tensor = parts[""]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            _damaged(path, f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, its layout says {dtype} {shape}")
        return tensor
    values = parts[_VALUES]
    if values.dtype != dtype or values.dim() != 1:
        _damaged(path, f"tensor {name}'s values are {values.dtype} of {values.dim()} dimensions, not 1-D {dtype}")
    positions = (_bitmask_positions(name, parts[_BITMASK], entries, path) if encoding == BITMASK
                 else _checked_indices(name, parts[_INDICES], entries, path))
    if positions.numel() != values.numel():
        _damaged(path, f"tensor {name} has {positions.numel()} stored positions but {values.numel()} values")
    dense = torch.zeros(entries, dtype=dtype)
    dense[positions] = values
    return dense.reshape(shape)


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape)


def _bitmask_positions(name: str, bitmask: Tensor, entries: int, path) -> Tensor:
    if bitmask.dtype != torch.uint8 or list(bitmask.shape) != [math.ceil(entries / 8)]:
        _damaged(path, f"tensor {name}'s bitmask is {bitmask.dtype} {list(bitmask.shape)}, "
                       f"not uint8 [{math.ceil(entries / 8)}]")
    bits = np.unpackbits(bitmask.numpy(), bitorder="little")
    if bits[entries:].any():
        _damaged(path, f"tensor {name}'s bitmask sets bits past its {entries} entries")
    return torch.from_numpy(bits[:entries].astype(bool)).nonzero().reshape(-1)


def _checked_indices(name: str, indices: Tensor, entries: int, path) -> Tensor:
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        _damaged(path, f"tensor {name}'s indices are {indices.dtype} of {indices.dim()} dimensions, not 1-D int")
    positions = indices.long()
    if positions.numel() and (positions[0] < 0 or positions[-1] >= entries or (positions.diff() <= 0).any()):
        _damaged(path, f"tensor {name}'s indices are not increasing positions within its {entries} entries")
    return positions


def _damaged(path, problem: str) -> None:
    raise PrunekitError(f"{path} is not a valid prunekit sparse weight file: {problem}; write it again with "
                        "prunekit export --format sparse (or prunekit.save_sparse)")
