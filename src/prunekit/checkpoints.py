"""Checkpoints: read weights without unpickling code, fit foreign key layouts onto zoo models, save safetensors."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.io import atomic_path
from prunekit.masks import is_parametrization_state, masked_by, parametrized_key, plain_key
from prunekit.models import create_model, list_models

Normalization = tuple[tuple[float, ...], tuple[float, ...]]

# The shared WoodFisher MLPNet checkpoint pickles these two classes (as its optimizer's and scheduler's type);
# nothing else is allowed, and only the model's tensors are kept.
_ALLOWED_PICKLED_CLASSES = [torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR]

# Where training scripts nest the model's state dict inside a checkpoint dict, in order of preference.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")

# Foreign key layouts, rewritten in order on every key: (pattern, replacement).
_KEY_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^module\."), ""),  # saved from nn.DataParallel / DistributedDataParallel
    (re.compile(r"\._layer\."), "."),  # WoodFisher's masking wrapper: X._layer.weight is X.weight
)

# Mask buffers and the tensor each one gates: (mask key pattern, gated key template), for WoodFisher's
# masked layers (prunekit's own masks: `masks.masked_by`).
# A mask the model does not hold itself is multiplied into the tensor it gates (a mask of ones changes nothing).
_MASK_TARGETS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.+)\._weight_mask$"), r"\1.weight"),  # WoodFisher
)

# Published checkpoints recognised by their `arch` metadata, and the input normalisation they were trained with.
_KNOWN_NORMALIZATIONS: dict[str, Normalization] = {
    "mlpnet": ((0.1307,), (0.3081,)),  # WoodFisher / CHITA MLPNet on MNIST
    "resnet20_cifar": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # Distiller; the usual CIFAR statistics give ~53%
}

_MAX_LISTED = 5


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint's tensors (keys as saved) and its plain metadata, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _split_checkpoint(_load_torch_file(path), path)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and header metadata (string values) of a safetensors file; a sparse weight file decoded."""
    from prunekit.export.sparse_files import decode_sparse, is_sparse_file  # it saves through this module

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as error:
        raise PrunekitError(f"{path} is not a valid safetensors file ({_one_line(error)}); re-export it") from error
    return decode_sparse(tensors, metadata, path) if is_sparse_file(metadata) else (tensors, metadata)


def _load_torch_file(path: Path) -> object:
    """torch.load restricted to tensors and plain containers."""
    try:
        with torch.serialization.safe_globals(_ALLOWED_PICKLED_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise PrunekitError(_unpickling_refusal(path, error)) from error
    except Exception as error:  # torch.load fails on a non-checkpoint with many exception types
        raise PrunekitError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: {_one_line(error)}); "
            "check that the file is complete and is a torch.save or .safetensors file"
        ) from error


def _unpickling_refusal(path: Path, error: pickle.UnpicklingError) -> str:
    """Why a file that only full unpickling could read is refused, and how to convert it."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        problem = f"{path} would need arbitrary unpickling to load (it contains the pickled object {found[1]})"
    else:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), re.DOTALL)
        problem = (
            f"{path} cannot be read as weights only ({_one_line(reason[1] if reason else error)}): it is not a torch "
            "checkpoint, or it would need arbitrary unpickling"
        )
    return (
        f"{problem}; unpickling can run any code, so prunekit refuses it. To convert a checkpoint once, in an "
        "environment you trust: load it with torch.load(path, weights_only=False), put its weights into the "
        "model, and save model.state_dict() with safetensors.torch.save_file(model.state_dict(), "
        "'model.safetensors') or torch.save(model.state_dict(), 'model.pt'); then pass that file"
    )


def _one_line(detail: object) -> str:
    """A library's error text with its line breaks collapsed: prunekit errors are one line."""
    return " ".join(str(detail).split())


def _split_checkpoint(content: object, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict inside a loaded torch checkpoint, and its plain metadata entries."""
    if isinstance(content, Mapping):
        for key in _NESTED_STATE_KEYS:
            if isinstance(content.get(key), Mapping):
                metadata = {k: v for k, v in content.items() if k != key and _is_simple_metadata(v)}
                return _tensors_only(content[key], path), metadata
        if content and all(isinstance(value, Tensor) for value in content.values()):
            return dict(content), {}
    found = type(content).__name__
    if isinstance(content, Mapping):
        found = f"a dict with keys {sorted(map(str, content))[:10]}"
    raise PrunekitError(
        f"{path} holds {found}, not a state dict or a dict with one under {' / '.join(_NESTED_STATE_KEYS)}; "
        "save model.state_dict() instead"
    )


def _tensors_only(state: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """The state dict itself, refused if any entry is not a tensor."""
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise PrunekitError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "save a plain model.state_dict()"
            )
    return dict(state)


def _is_simple_metadata(value: object) -> bool:
    """True for a scalar or string, or a flat dict of them (such as WoodFisher's model_config)."""
    if isinstance(value, Mapping):
        return all(isinstance(key, str) and _is_scalar(item) for key, item in value.items())
    return _is_scalar(value)


def _is_scalar(value: object) -> bool:
    """True for None, bool, int, float and str."""
    return value is None or isinstance(value, (str, int, float, bool))


def normalize_state_dict(state: Mapping[str, Tensor], model_keys: Collection[str] = ()) -> dict[str, Tensor]:
    """Rewrite foreign key layouts, fold masks the model lacks into their weights, use its parametrized names."""
    renamed = {_rewrite_key(key): tensor for key, tensor in state.items()}
    if len(renamed) != len(state):
        raise PrunekitError("checkpoint holds the same tensor under two layouts (e.g. with and without 'module.')")
    folded = _fold_masks(renamed, frozenset(model_keys))
    return {_model_key(key, model_keys): tensor for key, tensor in folded.items()}


def _rewrite_key(key: str) -> str:
    """Apply every rewrite in `_KEY_REWRITES` to one key."""
    for pattern, replacement in _KEY_REWRITES:
        key = pattern.sub(replacement, key)
    return key


def _fold_masks(state: dict[str, Tensor], model_keys: frozenset[str]) -> dict[str, Tensor]:
    """Multiply each mask the model does not hold into the tensor it gates, and drop the mask."""
    folded = dict(state)
    for key, mask in state.items():
        target = _mask_target(key)
        if target is None or key in model_keys or target not in folded:
            continue
        if folded[target].shape != mask.shape:
            raise PrunekitError(
                f"mask {key} has shape {tuple(mask.shape)} but {target} has {tuple(folded[target].shape)}; "
                "the checkpoint is inconsistent"
            )
        folded[target] = folded[target] * mask
        del folded[key]
    return folded


def _mask_target(key: str) -> str | None:
    """The key a mask buffer gates, or None if `key` is not a mask."""
    for pattern, template in _MASK_TARGETS:
        if pattern.match(key):
            return pattern.sub(template, key)
    return masked_by(key)


def _model_key(key: str, model_keys: Collection[str]) -> str:
    """Name a weight as the model does: plain unless the model parametrizes it."""
    if key in model_keys:
        return key
    plain = plain_key(key)
    if plain is not None:
        return plain
    candidate = parametrized_key(key)
    return candidate if candidate in model_keys else key


def load_state_dict_into(model: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy `state` into `model` after checking keys, shapes and values; nothing is copied if a check fails."""
    expected = model.state_dict()
    state = normalize_state_dict(state, expected.keys())
    _check_layout(state, expected, strict)
    _check_finite(state)
    model.load_state_dict({key: tensor for key, tensor in state.items() if key in expected}, strict=False)


def _check_layout(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], strict: bool) -> None:
    """Refuse shape mismatches always, and missing or unexpected keys when strict."""
    # The model's own parametrization state (e.g. its masks) keeps its values when the checkpoint has none.
    missing = [key for key in expected if key not in state and not is_parametrization_state(key)]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in state
        if key in expected and state[key].shape != expected[key].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise PrunekitError(_layout_report(missing, unexpected, mismatched, state))


def _layout_report(
    missing: list[str], unexpected: list[str], mismatched: list[str], state: Mapping[str, Tensor]
) -> str:
    """A one-line error listing the first mismatches of each kind and the zoo models the checkpoint fits."""
    parts = []
    for label, keys in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                        ("with a different shape", mismatched)):
        if keys:
            more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:_MAX_LISTED])}{more}")
    matches = models_matching(state)
    if matches:
        parts.append(f"its keys match --model {' or '.join(matches)}; if that is the model you chose, "
                     "the shapes point to a different number of classes or input channels")
    else:
        known = ", ".join(list_models())
        parts.append(f"its keys match no zoo model ({known}); check which network it was saved from")
    return "the checkpoint does not fit the model: " + "; ".join(parts)


def models_matching(state: Mapping[str, Tensor]) -> list[str]:
    """Zoo models (default options) whose plain state dict keys equal the checkpoint's, built on the meta device."""
    keys = set(normalize_state_dict(state))
    matches = []
    for name in list_models():
        with torch.device("meta"):
            if set(create_model(name).state_dict()) == keys:
                matches.append(name)
    return matches


def _check_finite(state: Mapping[str, Tensor]) -> None:
    """Refuse floating tensors holding NaN or Inf."""
    for key, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise PrunekitError(
                    f"checkpoint tensor {key} holds {bad} NaN/Inf values of {tensor.numel()}; "
                    "the checkpoint is corrupt or from a diverged run, use another one"
                )


def load_pretrained(
    model_name: str, path: str | os.PathLike, num_classes: int = 10, **model_options: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a zoo model, load a checkpoint into it, and return it with metadata including `normalization`."""
    model = create_model(model_name, num_classes=num_classes, **model_options)
    state, metadata = read_state_dict(path)
    load_state_dict_into(model, state)
    return model, {**metadata, "normalization": checkpoint_normalization(metadata)}


def checkpoint_normalization(metadata: Mapping[str, Any]) -> Normalization | None:
    """The (mean, std) a checkpoint's inputs need, or None for the data set's default."""
    if "normalization" in metadata:
        return _parse_normalization(metadata["normalization"])
    return _KNOWN_NORMALIZATIONS.get(_checkpoint_arch(metadata))


def _checkpoint_arch(metadata: Mapping[str, Any]) -> str | None:
    """The architecture name a training script recorded: top-level `arch`, or WoodFisher's `model_config.arch`."""
    model_config = metadata.get("model_config")
    nested = model_config.get("arch") if isinstance(model_config, Mapping) else None
    arch = metadata.get("arch", nested)
    return arch if isinstance(arch, str) else None


def _parse_normalization(value: Any) -> Normalization:
    """A (mean, std) pair of equal-length per-channel tuples, from JSON text or a sequence."""
    try:
        mean, std = json.loads(value) if isinstance(value, str) else value
        pair = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError) as error:
        raise PrunekitError(
            f"checkpoint metadata 'normalization' is {value!r}; it must be [[mean, ...], [std, ...]]"
        ) from error
    if not pair[0] or len(pair[0]) != len(pair[1]) or min(pair[1]) <= 0:
        raise PrunekitError(
            f"checkpoint metadata 'normalization' is {value!r}; mean and std need one value per channel, std > 0"
        )
    return pair


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with each parametrized tensor evaluated and stored under its plain name."""
    state = {}
    for key, tensor in model.state_dict().items():
        plain = plain_key(key)
        if plain is not None:
            owner, _, name = plain.rpartition(".")
            state[plain] = getattr(model.get_submodule(owner), name)
        elif not is_parametrization_state(key):
            state[key] = tensor
    return state


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Atomically write the model's plain weights and metadata (non-strings JSON-encoded) as safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PrunekitError(f"save_model writes safetensors; name the file *.safetensors, not {path.name}")
    header = encode_metadata(metadata)
    # Cloning gives each tensor its own storage, which safetensors requires.
    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in plain_state_dict(model).items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)


def encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors header metadata: strings as they are, everything else as JSON."""
    header = {}
    for key, value in metadata.items():
        try:
            header[str(key)] = value if isinstance(value, str) else json.dumps(value)
        except TypeError as error:
            raise PrunekitError(
                f"metadata {key!r} is a {type(value).__name__}, which JSON cannot encode; pass plain data"
            ) from error
    return header
