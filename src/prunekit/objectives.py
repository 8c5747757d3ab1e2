"""What training and evaluation minimise: an objective turns a batch into a mean loss.

An `Objective` gives the mean loss of a batch together with the model's outputs (so metrics need no
second forward pass) and, where accuracy means something, the number of correct predictions.
`as_objective` accepts what users pass as `loss=`: None (cross-entropy on `(inputs, targets)`), an
Objective, or a plain callable `loss(model, batch) -> scalar tensor`.

A batch is an `(inputs, targets)` tuple or a mapping of tensors (Hugging Face style, for objectives
that call `model(**batch)`); `to_device` and `batch_examples` handle both.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError

Batch = Any  # an (inputs, targets) tuple or a mapping of tensors


class Objective:
    """How a batch becomes a loss; override `loss`, and `correct` where accuracy means something."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        """The batch's mean loss (a scalar tensor to backpropagate) and the model's outputs."""
        raise NotImplementedError

    def correct(self, outputs: Any, batch: Batch) -> torch.Tensor | None:
        """Correct predictions in the batch as an integer tensor (left on the device), or None: no accuracy."""
        return None


@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Classification: cross-entropy of `model(inputs)` logits against class indices, top-1 accuracy."""

    label_smoothing: float = 0.0

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = _inputs_and_targets(batch)
        logits = model(inputs)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing), logits

    def correct(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (outputs.argmax(dim=1) == batch[1]).sum()


class LossFunction(Objective):
    """A plain `loss(model, batch) -> scalar tensor`: a loss, no accuracy."""

    def __init__(self, function: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        self.function = function

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, None]:
        value = self.function(model, batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PrunekitError(f"loss {self.function!r} returned {shape}, not a scalar tensor: return the mean "
                                "loss over the batch (e.g. end with .mean())")
        return value, None


# What `loss=` accepts: None (cross-entropy), an Objective, or a callable loss(model, batch) -> scalar tensor.
Loss = Objective | Callable[[nn.Module, Batch], torch.Tensor] | None


def as_objective(loss: Loss) -> Objective:
    """The objective for `loss=`: None → CrossEntropy(), an Objective as is, a callable wrapped (no accuracy)."""
    if loss is None:
        return CrossEntropy()
    if isinstance(loss, Objective):
        return loss
    if callable(loss):
        return LossFunction(loss)
    raise PrunekitError(f"loss={loss!r} is invalid: pass None (cross-entropy), a prunekit.objectives.Objective, "
                        "or a callable loss(model, batch) -> scalar tensor")


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor in it (in a tuple, list or mapping) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [to_device(item, device) for item in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(item, device) for item in batch)
    return batch


def batch_examples(batch: Batch) -> int:
    """Examples in a batch: the first dimension of its first tensor that has one."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return item.shape[0]
    raise PrunekitError(f"a batch of type {type(batch).__name__} holds no tensor with a batch dimension; "
                        "pass (inputs, targets) tuples or mappings of tensors")


def _inputs_and_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise PrunekitError(f"cross-entropy takes (inputs, targets) batches, got a {type(batch).__name__}; "
                            "pass loss=<an Objective or a callable loss(model, batch)> for other batches")
    return batch[0], batch[1]
