"""Compact model files (`prunekit-compact/1`): a compacted model saved as safetensors and loaded back into a model
of the right shapes, without unpickling anything.

A compact model keeps its classes with narrower layers, so its weights alone do not say how to build it: the
file's metadata records, beside the weights, what compaction changed in each module (`module_sizes`: every
integer attribute that differs from the dense model's, e.g. a convolution's `out_channels`, a pad's
`pad_after`, GPT-2's `split_size`), the config values it changed (`config`, `hf_config`) and the memory format
measured fastest (`memory_format`, applied again on load; the tensors themselves are stored contiguous, as
safetensors requires). `load_compact(path, model)` takes the model as built before pruning (the same zoo
name and options, or the same Hugging Face folder), sets the recorded sizes, gives each tensor the file's
shape and loads the weights through `checkpoints.load_state_dict_into` (keys, shapes and values checked).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import PrunekitError
from .hf_config import config_changes, is_hf_model
from .memory_format import MEMORY_FORMATS, memory_format_of, to_memory_format

COMPACT_FILE_FORMAT = "prunekit-compact/1"


def save_compact(compacted: nn.Module, dense: nn.Module, path: str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Write `compacted` (`prunekit.compact`'s result) to a safetensors file that `load_compact` reads back into a
    model built like `dense`; `metadata` (plain data) is stored with it."""
    from ..checkpoints import save_model

    save_model(compacted, path, {**(metadata or {}), "format": COMPACT_FILE_FORMAT,
                                 "module_sizes": module_sizes(dense, compacted),
                                 "config": config_changes(dense, compacted),
                                 "memory_format": memory_format_of(compacted)})


def is_compact_file(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors file's metadata is a compact model's (`save_compact`)."""
    return metadata.get("format") == COMPACT_FILE_FORMAT


def load_compact(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Resize `model`, in place, to the compact model saved at `path` and load its weights; returns `model`.

    `model` is built as the dense model was before pruning. Its modules get the recorded sizes, its config the
    recorded values, each of its tensors the file's shape, and it is left in the recorded memory format (call
    `fastest_memory_format` to measure again on this machine).
    """
    from ..checkpoints import load_state_dict_into, read_state_dict

    if Path(path).suffix != ".safetensors":
        raise PrunekitError(f"{path} is not a compact model file: `prunekit export --format compact` writes "
                            "*.safetensors")
    tensors, metadata = read_state_dict(path)
    if metadata.get("format") != COMPACT_FILE_FORMAT or "module_sizes" not in metadata:
        raise PrunekitError(f"{path} is not a compact model file with its module sizes (format "
                            f"{metadata.get('format')!r}); write one with `prunekit export --format compact` or "
                            "prunekit.export.save_compact")
    for name, sizes in json.loads(metadata["module_sizes"]).items():
        _set_sizes(model, name, sizes)
    config = json.loads(metadata.get("config", "{}"))
    if config and is_hf_model(model):
        for key, value in config.items():
            setattr(model.config, key, value)
    _reshape_tensors(model, tensors)
    load_state_dict_into(model, tensors)
    recorded = metadata.get("memory_format")
    if recorded in MEMORY_FORMATS:
        to_memory_format(model, recorded)
    return model


def module_sizes(dense: nn.Module, compacted: nn.Module) -> dict[str, dict[str, int]]:
    """Per module name, the integer attributes (sizes) that compaction changed: what rebuilds the compact model."""
    before = dict(dense.named_modules())
    changed: dict[str, dict[str, int]] = {}
    for name, module in compacted.named_modules():
        original = before.get(name)
        if original is None:
            raise PrunekitError(f"module {name!r} is not the dense model's: save_compact takes the dense model the "
                                "compact one was made from")
        sizes = {key: value for key, value in vars(module).items()
                 if _is_size(value) and vars(original).get(key) != value}
        if sizes:
            changed[name] = sizes
    return changed


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _set_sizes(model: nn.Module, name: str, sizes: Mapping[str, Any]) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PrunekitError(f"the compact file resizes module {name!r}, which the model has not: load it into the "
                            "model it was exported from (same zoo name and options, or the same folder)") from None
    for key, value in sizes.items():
        if not (_is_size(value) and _is_size(vars(module).get(key))):
            raise PrunekitError(f"the compact file sets {name}.{key} = {value!r}, which is not a size the model's "
                                f"{type(module).__name__} has: load it into the model it was exported from")
        setattr(module, key, value)


def _reshape_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give each parameter and buffer of `model` the file's shape (uninitialised: the weights are loaded next);
    tensors shared by several modules (tied weights) stay shared."""
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old): (old, held so no id is reused; new)
    for key, tensor in tensors.items():
        owner_name, _, attribute = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue  # load_state_dict_into names the keys the model has not
        current = getattr(owner, attribute, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        if id(current) not in replaced:
            fresh = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                fresh = nn.Parameter(fresh, current.requires_grad)
            replaced[id(current)] = current, fresh
        setattr(owner, attribute, replaced[id(current)][1])
