"""Compaction: a masked model made physically smaller, its pruned channels removed, with the same outputs.

`compact(model, example_inputs)` copies the model with its masks folded into the weights, finds its
coupled channel groups (`prunekit.channels`, one forward pass) and removes every group whose
masks read nothing: the producers' output rows, biases and batch-norm entries, the consumers'
input columns, and the zero channels of an option-A shortcut's pad. A group is removed when every
input column that reads it is masked, so the masked model and the compact one compute the same
function (a removed channel may still carry a batch-norm shift in the masked model, but nothing
reads it). Masks that remove part of a group (a filter whose channel a residual add or a
following layer still reads) cannot be removed exactly and are refused with the layer's name;
`structure="groups"` makes masks that always can. The result is checked against the masked
model's outputs on the example inputs before it is returned.

Modules are kept and resized in place (a compact ResNet is still a `CifarResNet`), so the result
is a plain PyTorch model: it trains, pickles, scripts and exports like the original. A Hugging Face
model's config is updated where it can describe the new shapes (`hf_config`: the feed-forward width
when every layer keeps the same count; never removed heads). Saved with `compact_files.save_compact`,
which records every module's new sizes, it loads back into the dense model with `load_compact`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..channels import CONVOLUTIONS, ChannelGroups, Layer, Split, channel_groups, out_in, tensors_in
from ..errors import PrunekitError
from ..masks import folded_copy, get_masks
from ..modes import model_mode
from ..objectives import call_model
from .hf_config import update_config

OUTPUT_TOLERANCE = 1e-4  # relative to the largest output: removing zero terms only reorders sums


def compact(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A physically smaller copy of `model` with its pruned channels removed; `model` is left as it is.

    `example_inputs` is what `model` is called with (a tensor, or a mapping of keyword arguments as in
    `model(**batch)`); the copy's outputs on them equal the masked model's in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"compact takes a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise PrunekitError("compact runs the model once to find its channel groups: pass example_inputs, e.g. "
                            "torch.zeros(1, 3, 32, 32) for a CIFAR model")
    masks = get_masks(model)
    compacted = folded_copy(model)
    groups = channel_groups(compacted, example_inputs)
    kept = kept_groups(groups, masks)
    with torch.no_grad():
        for layer in groups.layers.values():
            _resize_layer(layer, *_kept_slices(groups, layer, kept))
        for norm in groups.norms.values():
            _resize_norm(norm.module, kept[groups.index(norm.ids)])
        for pad in groups.pads:
            _resize_pad(pad.module_name, pad.module, int(kept[groups.index(pad.before)].sum()),
                        int(kept[groups.index(pad.after)].sum()))
        for split in groups.splits:
            parts = [int(kept[groups.index(part)].sum()) for part in split.parts]
            _resize_split(split, parts)
    _check_same_outputs(model, compacted, example_inputs)
    update_config(compacted)
    return compacted


@dataclass
class _Slices:
    """How a group's slices are masked: input columns in all, columns masked whole, and any slice masked whole."""

    columns: torch.Tensor
    dead_columns: torch.Tensor
    any_dead: torch.Tensor


def kept_groups(groups: ChannelGroups, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """True for each group that stays (and for index `groups.size`, the channels in no group); masks that remove
    part of a group are refused."""
    slices = _Slices(*(torch.zeros(groups.size + 1, dtype=torch.long) for _ in range(3)))
    for layer in groups.layers.values():
        _count_dead(groups, layer, masks.get(layer.name), slices)
    removed = (slices.columns > 0) & (slices.dead_columns == slices.columns)
    misaligned = (slices.any_dead > 0) & ~removed
    misaligned[groups.size] = False
    if misaligned.any():
        raise PrunekitError(_misaligned_message(groups, masks, int(misaligned.nonzero()[0])))
    removed[groups.size] = False
    return ~removed


def _count_dead(groups: ChannelGroups, layer: Layer, mask: torch.Tensor | None, slices: _Slices) -> None:
    rows, columns = groups.rows_and_columns(layer)
    mask = torch.ones(len(rows), 1, dtype=torch.bool) if mask is None else out_in(mask.cpu(), layer.layout)
    dead_rows = ~mask.flatten(1).any(1)
    slices.any_dead.index_add_(0, rows, dead_rows.long())
    if columns is not None:
        dead_columns = ~mask.transpose(0, 1).flatten(1).any(1) if mask.dim() > 1 and mask.shape[1] == len(columns) \
            else torch.zeros(len(columns), dtype=torch.bool)
        slices.columns.index_add_(0, columns, torch.ones_like(columns))
        slices.dead_columns.index_add_(0, columns, dead_columns.long())
        slices.any_dead.index_add_(0, columns, dead_columns.long())


def _misaligned_message(groups: ChannelGroups, masks: dict[str, torch.Tensor], group: int) -> str:
    """Name a layer whose mask removes a slice of `group` and one that still keeps a slice of it."""
    dead, alive = [], []
    for layer in groups.layers.values():
        rows, columns = groups.rows_and_columns(layer)
        mask = masks.get(layer.name)
        mask = None if mask is None else out_in(mask.cpu(), layer.layout)
        for kind, index, axis in (("output row", rows, 0), ("input column", columns, 1)):
            if index is None:
                continue
            for position in (index == group).nonzero().flatten().tolist():
                whole = None if mask is None else mask.select(axis, position)
                (dead if whole is not None and not whole.any() else alive).append(f"{kind} {position} of {layer.name}")
    return (f"cannot compact: the masks remove {dead[0]} but keep {alive[0] if alive else 'other slices'} of the same "
            "coupled channel (a residual add, a batch norm or a following layer still reads it); compaction "
            "removes whole coupled channel groups only: prune with structure='groups' (--structure groups)")


def _kept_slices(groups: ChannelGroups, layer: Layer, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, columns = groups.rows_and_columns(layer)
    return kept[rows], None if columns is None else kept[columns]


def _resize_layer(layer: Layer, rows: torch.Tensor, columns: torch.Tensor | None) -> None:
    """Slice a conv/linear weight and bias to the kept rows (outputs) and columns (inputs); update its sizes."""
    module = layer.module
    device = module.weight.device  # the group decisions live on the CPU
    rows, columns = rows.to(device), None if columns is None else columns.to(device)
    weight = out_in(module.weight, layer.layout)[rows]
    if columns is not None:
        weight = weight[:, columns]
    module.weight = nn.Parameter(out_in(weight, layer.layout).contiguous(), module.weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias[rows].contiguous(), module.bias.requires_grad)
    outputs = int(rows.sum())
    if isinstance(module, CONVOLUTIONS):
        if layer.depthwise:
            module.groups = module.groups * outputs // module.out_channels
            module.in_channels = module.groups
        elif columns is not None:
            module.in_channels = int(columns.sum()) * module.groups
        module.out_channels = outputs
    elif isinstance(module, nn.Linear):
        module.out_features = outputs
        module.in_features = weight.shape[1]
    else:  # transformers' Conv1D: `nf` outputs, weight stored in × out
        module.nf = outputs


def _resize_norm(module: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if value is not None:
            setattr(module, name, nn.Parameter(value[keep.to(value.device)].contiguous(), value.requires_grad))
    for name in ("running_mean", "running_var"):
        value = getattr(module, name, None)
        if value is not None:
            setattr(module, name, value[keep.to(value.device)].contiguous())
    module.num_features = int(keep.sum())


def _resize_pad(module_name: str, module: nn.Module | None, before: int, after: int) -> None:
    """A channel pad's zero channels that survive: the module must say how many it adds (`pad_before/after`)."""
    if not (hasattr(module, "pad_before") and hasattr(module, "pad_after")):
        raise PrunekitError(f"cannot compact: {_named(module_name, module)} pads channels with "
                            "zeros, and compaction resizes a pad only through the module's pad_before and pad_after "
                            "attributes (as prunekit's PaddedIdentity has); add them, or leave its channels dense")
    module.pad_before, module.pad_after = before, after


def _resize_split(split: Split, kept: list[int]) -> None:
    """A split's parts must shrink alike; a split by size needs the size in the module (`split_size`, as GPT-2's
    attention has), a split into a number of parts (`chunk`) follows by itself."""
    size = len(split.parts[0])
    if all(count == len(part) for count, part in zip(kept, split.parts)):
        return
    module = split.module
    resizable = not split.by_size or getattr(module, "split_size", None) == size
    if len(set(kept)) != 1 or any(len(part) != size for part in split.parts) or not resizable:
        raise PrunekitError(f"cannot compact: {_named(split.module_name, module)} splits channels "
                            f"into parts of {[len(part) for part in split.parts]}, which would become {kept}; "
                            "compaction resizes equal parts only, split by number (chunk) or through the module's "
                            "split_size attribute (as GPT-2's attention has)")
    if split.by_size:
        module.split_size = kept[0]


def _named(module_name: str, module: nn.Module | None) -> str:
    kind = type(module).__name__
    return f"module {module_name!r} ({kind})" if module_name else f"the model ({kind})"


def _check_same_outputs(model: nn.Module, compacted: nn.Module, inputs: Any) -> None:
    """The compact model must compute what the masked one does; anything else is a bug worth stopping for."""
    with torch.no_grad(), model_mode(model, training=False), model_mode(compacted, training=False):
        expected = list(tensors_in(call_model(model, inputs)))
        got = list(tensors_in(call_model(compacted, inputs)))
    for want, have in zip(expected, got):
        scale = float(want.abs().max()) if want.numel() and want.is_floating_point() else 1.0
        if want.shape != have.shape or not torch.allclose(want, have, rtol=0, atol=OUTPUT_TOLERANCE * max(scale, 1.0)):
            raise PrunekitError(f"compaction changed the model's outputs ({tuple(want.shape)} vs {tuple(have.shape)}, "
                                "see prunekit.channels); this is a prunekit bug: please report it with the model")
