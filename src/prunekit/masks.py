"""Masks as parametrizations: attach, read, make permanent, measure, save and load."""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from .errors import PrunekitError
from .io import atomic_path
from .version import __version__

if TYPE_CHECKING:
    from .targets import Target

MASKED = "masked"
STRAIGHT_THROUGH = "straight_through"
GRADIENT_MODES = (MASKED, STRAIGHT_THROUGH)
MASK_FILE_FORMAT = "prunekit-masks/1"


# torch.nn.utils.parametrize's names, known in this module only: a parametrized tensor `owner.W` is
# stored as `owner.parametrizations.W.original`, and the i-th parametrization's buffers as
# `owner.parametrizations.W.<i>.<buffer>` (a prunekit mask: `...W.<i>.mask`).
_PARAMETRIZED = re.compile(r"^((?:.+\.)?)parametrizations\.([^.]+)\.original$")
_MASK_BUFFER = re.compile(r"^((?:.+\.)?)parametrizations\.([^.]+)\.\d+\.mask$")
_PARAMETRIZATION_BUFFER = re.compile(r"(^|\.)parametrizations\.[^.]+\.\d+\.")


def _parametrized(plain: str, part: str) -> str:
    owner, dot, name = plain.rpartition(".")
    return f"{owner}{dot}parametrizations.{name}.{part}"


def parametrized_key(plain: str) -> str:
    """The state-dict key of tensor `plain` (e.g. `fc.weight`) once it is parametrized."""
    return _parametrized(plain, "original")


def mask_buffer_key(plain: str, index: int) -> str:
    """The key of the mask of the `index`-th parametrization of tensor `plain`."""
    return _parametrized(plain, f"{index}.mask")


def plain_key(key: str) -> str | None:
    """`fc.weight` for `fc.parametrizations.weight.original`; None for a key that is not a parametrized tensor."""
    match = _PARAMETRIZED.match(key)
    return match[1] + match[2] if match else None


def masked_by(key: str) -> str | None:
    """For a parametrization's mask buffer, the key of the tensor it gates; else None."""
    match = _MASK_BUFFER.match(key)
    return parametrized_key(match[1] + match[2]) if match else None


def is_parametrization_state(key: str) -> bool:
    """Whether `key` is a buffer of a parametrization (a mask), not a tensor of the model itself."""
    return _PARAMETRIZATION_BUFFER.search(key) is not None


def unmasked(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The trainable tensor behind `module.<name>`: the original when a parametrization (a mask) is attached."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


class _StraightThroughMask(torch.autograd.Function):
    """Forward multiplies by the mask; backward passes the gradient to every dense weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Mask(nn.Module):
    """Parametrization `weight = original * mask`.

    masked: pruned weights get no gradient. straight_through: the gradient taken at the masked
    weight reaches the dense weight too, so pruned weights keep learning (DPF, BiP).
    The mask is kept in the weight's dtype because a same-dtype multiply is the cheapest op on the
    training hot path; `bool()` of it is the mask users see.
    """

    def __init__(self, mask: torch.Tensor, mode: str = MASKED):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())
        self.mode = _check_mode(mode)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == STRAIGHT_THROUGH:
            return _StraightThroughMask.apply(weight, self.mask)
        return weight * self.mask

    def extra_repr(self) -> str:
        return f"mode={self.mode}, kept={int(self.mask.sum())}/{self.mask.numel()}"


def _check_mode(mode: str) -> str:
    if mode not in GRADIENT_MODES:
        raise PrunekitError(f"gradient mode {mode!r} is unknown; use one of {', '.join(GRADIENT_MODES)}")
    return mode


def parametrizations_of(module: nn.Module, name: str = "weight") -> list[nn.Module]:
    """The parametrizations on `module.<name>`, in the order they apply (none if it is plain)."""
    if not parametrize.is_parametrized(module, name):
        return []
    return list(getattr(module.parametrizations, name))


def mask_of(module: nn.Module) -> Mask | None:
    """The prunekit mask on `module.weight`, if one is attached."""
    return next((p for p in parametrizations_of(module) if isinstance(p, Mask)), None)


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], mode: str = MASKED) -> None:
    """Attach (or update) masks on the named weights.

    In masked mode the dense weights at pruned positions are set to zero as well, so that weight
    decay and momentum cannot move them and removing the mask keeps them pruned.
    """
    _check_mode(mode)
    targets = _targets_by_name(model, masks)
    for name, mask in masks.items():
        _check_mask_shape(name, mask, targets[name])
    for name, mask in masks.items():
        target = targets[name]
        dense = target.dense
        value = mask.to(device=dense.device, dtype=dense.dtype)
        existing = mask_of(target.module)
        if existing is None:
            parametrize.register_parametrization(target.module, "weight", Mask(value, mode), unsafe=True)
        else:
            existing.mask.copy_(value)
            existing.mode = mode
        if mode == MASKED:
            with torch.no_grad():
                dense.mul_(value)


def set_gradient_mode(model: nn.Module, mode: str) -> None:
    """Switch every attached mask between masked and straight-through gradients."""
    _check_mode(mode)
    for module in model.modules():
        mask = mask_of(module)
        if mask is not None:
            mask.mode = mode


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Boolean masks of every masked weight, by state-dict name (`fc1.weight`)."""
    masks = {}
    for module_name, module in model.named_modules():
        mask = mask_of(module)
        if mask is not None:
            name = f"{module_name}.weight" if module_name else "weight"
            masks[name] = mask.mask.bool()
    return masks


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into plain weights and remove the parametrizations; returns `model`.

    Pruned entries become +0.0 (weight × 0 is -0.0 for a negative weight), so that a pruned weight is all-zero
    bits: what sparse weight files leave out.
    """
    for module in model.modules():
        mask = mask_of(module)
        if mask is not None:
            pruned = mask.mask == 0
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            with torch.no_grad():
                module.weight.masked_fill_(pruned, 0.0)
    return model


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with its masks folded into plain weights (pruned entries +0.0); `model` keeps them.

    Not make_permanent on a deep copy: parametrize generates one class per masked module, which the copy
    shares, and removing the parametrization from the copy would delete the original's `weight` with it.
    """
    copied = copy.deepcopy(model)
    for module in copied.modules():
        mask = mask_of(module)
        if mask is not None:
            with torch.no_grad():
                weight = module.weight.detach().clone().masked_fill_(mask.mask == 0, 0.0)
            requires_grad = unmasked(module).requires_grad
            plain_class = parametrize.type_before_parametrizations(module)
            del module.parametrizations
            module.__class__ = plain_class
            module.weight = nn.Parameter(weight, requires_grad)
    return copied


def _targets_by_name(model: nn.Module, names) -> dict[str, Target]:
    from .targets import maskable_weights  # targets.py reads the parametrization names from here

    targets = maskable_weights(model)
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise PrunekitError(
            f"masks name {len(unknown)} tensor(s) that are not prunable weights of this model, "
            f"first: {unknown[:5]}; its prunable weights are {list(targets)[:5]}"
            f"{' ...' if len(targets) > 5 else ''}. Were the masks made for another model?"
        )
    return targets


def _check_mask_shape(name: str, mask: torch.Tensor, target: Target) -> None:
    if tuple(mask.shape) != tuple(target.shape):
        raise PrunekitError(
            f"mask for {name} has shape {tuple(mask.shape)} but the weight has {tuple(target.shape)}; "
            "were the masks made for another model?"
        )


# ---------------------------------------------------------------- measuring

@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass(frozen=True)
class SparsityReport:
    layers: list[LayerSparsity]
    skipped: list  # targets.Skipped

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    def __str__(self) -> str:
        from .tables import render_table

        rows = [[l.name, "×".join(map(str, l.shape)), l.numel, f"{l.sparsity:.4f}"] for l in self.layers]
        rows.append(["total (prunable)", "", self.numel, f"{self.sparsity:.4f}"])
        text = render_table(["tensor", "shape", "weights", "sparsity"], rows)
        if self.skipped:
            from .targets import describe_skipped  # targets.py reads the parametrization names from here

            text += "\n" + describe_skipped(self.skipped)
        return text


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Pruned entries / entries over all masks: the achieved sparsity of a prune, however structured."""
    return sum(int((~m.bool()).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Zeros / total of every prunable weight as the model computes with it."""
    from .targets import find_targets  # targets.py reads the parametrization names from here

    targets, skipped = find_targets(model)
    layers = []
    with torch.no_grad():
        for target in targets:
            weight = target.weight
            layers.append(LayerSparsity(target.name, tuple(weight.shape), weight.numel(), int((weight == 0).sum())))
    return SparsityReport(layers, skipped)


# ---------------------------------------------------------------- mask files

def save_masks(model_or_masks: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, object] | None = None) -> None:
    """Write boolean masks to a safetensors file, atomically, with JSON metadata."""
    masks = get_masks(model_or_masks) if isinstance(model_or_masks, nn.Module) else dict(model_or_masks)
    if not masks:
        raise PrunekitError("there are no masks to save: prune the model first (prunekit.prune)")
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    values = {"prunekit_version": __version__, "achieved_sparsity": mask_sparsity(tensors), **(metadata or {})}
    # Strings are JSON-encoded too: stored bare, a string such as "1" or "true" would read back as a number or bool.
    header = {**{key: json.dumps(value) for key, value in values.items()}, "format": MASK_FILE_FORMAT}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Masks and metadata from a prunekit mask file (JSON values decoded)."""
    if not os.path.exists(path):
        raise PrunekitError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            masks = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise PrunekitError(f"{path} is not a readable safetensors mask file ({exc})") from None
    if raw_meta.get("format") != MASK_FILE_FORMAT:
        raise PrunekitError(f"{path} is not a prunekit mask file (format {raw_meta.get('format')!r})")
    metadata = {key: _maybe_json(value) for key, value in raw_meta.items()}
    return {name: mask.bool() for name, mask in masks.items()}, metadata


def load_masks(model: nn.Module, path: str | os.PathLike, mode: str = MASKED) -> dict[str, object]:
    """Attach the masks stored in `path` to `model`; returns the file's metadata."""
    masks, metadata = read_masks(path)
    attach_masks(model, masks, mode)
    return metadata


def _maybe_json(value: str) -> object:
    """A header value decoded; files written before strings were JSON-encoded hold bare strings, kept as they are."""
    try:
        return json.loads(value)
    except ValueError:
        return value
