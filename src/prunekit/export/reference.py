"""Torch-Pruning's compaction of the channels a prunekit model's masks remove: the field's standard to compare with.

`torch_pruning_compact(model, example_inputs)` removes the same channels as `prunekit.compact` with
Torch-Pruning's DependencyGraph (each family cut once from its first producing layer, the rest
of the group following through the graph). The benchmark (`benchmarks/compaction_speed.py`) times
both side by side and the tests check that both give the same shapes and outputs. Needs the
`compare` extra (`pip install 'prunekit[compare]'`, torch-pruning); prunekit's own compaction does not.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..channels import CONVOLUTIONS, channel_groups
from ..errors import PrunekitError
from ..masks import folded_copy, get_masks
from .compaction import kept_groups


def torch_pruning_compact(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A copy of `model` with the channels its masks remove cut by Torch-Pruning (`model` is left as it is)."""
    tp = _torch_pruning()
    compacted = folded_copy(model)
    groups = channel_groups(compacted, example_inputs)
    kept = kept_groups(groups, get_masks(model))
    graph = tp.DependencyGraph().build_dependency(compacted, example_inputs=example_inputs)
    for family, members in groups.families.items():
        root = groups.root(family)
        rows = groups.rows_and_columns(root)[0]
        removed = [row for row, group in enumerate(rows.tolist()) if not kept[group] and group in set(members.tolist())]
        if removed:
            cut = tp.prune_conv_out_channels if isinstance(root.module, CONVOLUTIONS) else tp.prune_linear_out_channels
            graph.get_pruning_group(root.module, cut, idxs=removed).prune()
    return compacted


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise PrunekitError("comparing with Torch-Pruning needs it installed: pip install 'prunekit[compare]' "
                            "(torch-pruning==1.6.1)") from None
    return torch_pruning
