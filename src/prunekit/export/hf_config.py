"""A compacted Hugging Face model's `config` made to describe its new shapes, where transformers' config can.

A config describes one feed-forward width for every layer (`intermediate_size`; GPT-2's `n_inner`), so when
compaction leaves every layer the same number of feed-forward neurons, that key is set to it. Removed
attention heads cannot be described: BERT, ViT and GPT-2 derive the head size from `hidden_size /
num_attention_heads`, so fewer heads in the config would mean wider heads, and a per-layer count has no key
at all. Which is which is not guessed from names: a model of the same class is built from the config on the
meta device (no memory, milliseconds) and its shapes compared with the compacted model's; a key is changed
only when that makes strictly fewer tensors differ and none that matched. What still differs is reported
(`undescribed`): such a model is saved and loaded through prunekit's compact file (`compact_files`), which
records every module's sizes, not through `from_pretrained`.

transformers is never imported here: the model's own class builds the model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# Config keys of one feed-forward width for every layer, in the model families transformers names them so.
FEED_FORWARD_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model: it holds a config that its class builds from (duck-typed, never imported)."""
    return hasattr(getattr(model, "config", None), "to_dict") and hasattr(type(model), "config_class")


def update_config(model: nn.Module) -> None:
    """Set, in `model.config`, each feed-forward width that makes a model built from the config closer to
    `model`'s shapes (no-op for a model without a transformers config). `model.config` must be its own (compact
    works on a copy, whose config is a copy)."""
    if not is_hf_model(model):
        return
    differing = set(undescribed(model))
    for key in FEED_FORWARD_KEYS:
        if not differing or not hasattr(model.config, key):
            continue
        for width in sorted(_sizes(model, differing)):
            trial = copy.deepcopy(model.config)
            setattr(trial, key, width)
            now = set(_differing(model, trial))
            if now < differing:
                model.config, differing = trial, now


def undescribed(model: nn.Module) -> list[str]:
    """The state-dict keys whose shapes a model built from `model.config` would not have (empty when the config
    describes the model, or for a model without a transformers config)."""
    return _differing(model, model.config) if is_hf_model(model) else []


def config_changes(before: nn.Module, after: nn.Module) -> dict[str, Any]:
    """The config values `after` has that `before` has not (empty without transformers configs)."""
    if not (is_hf_model(before) and is_hf_model(after)):
        return {}
    old, new = before.config.to_dict(), after.config.to_dict()
    return {key: value for key, value in new.items() if old.get(key) != value}


def _differing(model: nn.Module, config: Any) -> list[str]:
    try:
        with torch.device("meta"):
            built = type(model)(copy.deepcopy(config))
    except Exception:  # a class that needs more than its config to build: nothing is described, nothing changed
        return list(model.state_dict())
    expected = {key: tensor.shape for key, tensor in built.state_dict().items()}
    return [key for key, tensor in model.state_dict().items() if expected.get(key) != tensor.shape]


def _sizes(model: nn.Module, keys: set[str]) -> set[int]:
    """Every dimension of the tensors that differ: the candidate widths."""
    state = model.state_dict()
    return {size for key in keys for size in state[key].shape}
