"""Learned mask scores, shared by BiP and Hydra: one real score per weight, the mask is their top-k.

The model computes with z = m ⊙ θ through prunekit's straight-through mask, so a backward pass
leaves ∂ℓ/∂z on each dense weight θ. The gradients these methods need follow from it in closed form:

    ∂ℓ/∂θ = m ⊙ ∂ℓ/∂z        the weights' gradient through the binary mask
    ∂ℓ/∂m = θ ⊙ ∂ℓ/∂z        the mask's gradient, passed straight through the top-k to |s|
    ∂ℓ/∂s = sign(s) ⊙ ∂ℓ/∂m  because the top-k ranks |s|

which is what the official BiP and Hydra layers get from autograd with their straight-through top-k.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..masks import STRAIGHT_THROUGH, Mask, attach_masks, mask_of
from ..targets import Target
from ..training import Callback, TrainConfig, Trainer
from . import PruneContext
from ._topk import TrackedTopK
from ._training import train_under_masks

STRUCTURES_BY_GROUP = ("filters", "channels", "groups")


class Scores:
    """A score tensor with the shape of each target weight; the mask keeps the budget's top-k of |score|.

    `project()` recomputes the mask from the scores into `multipliers`, the masks the model
    multiplies by (in the weights' dtype, attached straight-through the first time); `masks` are
    the same as booleans.
    """

    def __init__(self, ctx: PruneContext, initial: Mapping[str, torch.Tensor]):
        self.ctx = ctx
        self.tensors = {t.name: initial[t.name].detach().clone().to(t.dense.device).requires_grad_(True)
                        for t in ctx.targets}
        unstructured = ctx.budget.structure == "unstructured"
        self._tracked = TrackedTopK(ctx.plan.at(ctx.sparsity)) if unstructured else None
        self._parametrizations: dict[str, Mask] = {}

    def project(self) -> None:
        """Recompute the exact top-k mask from the scores and make the model compute with it."""
        if not self._parametrizations:
            # Written below, like every later mask: into the masks attached here, without walking the model again.
            attach_masks(self.ctx.model, {name: torch.ones_like(score, dtype=torch.bool)
                                          for name, score in self.tensors.items()}, STRAIGHT_THROUGH)
            self._parametrizations = {t.name: mask_of(t.module) for t in self.ctx.targets}
        if self._tracked is not None:
            self._tracked.select_into(self.tensors, self.multipliers)
            return
        for name, mask in self.ctx.select(self._ranking()).items():
            self._parametrizations[name].mask.copy_(mask)

    def set_gradient_mode(self, mode: str) -> None:
        """Switch the attached masks between masked and straight-through gradients (`masks.GRADIENT_MODES`)."""
        for parametrization in self._parametrizations.values():
            parametrization.mode = mode

    @property
    def multipliers(self) -> dict[str, torch.Tensor]:
        return {name: parametrization.mask for name, parametrization in self._parametrizations.items()}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: parametrization.mask.bool() for name, parametrization in self._parametrizations.items()}

    def _ranking(self) -> dict[str, torch.Tensor]:
        if self.ctx.budget.structure in STRUCTURES_BY_GROUP:
            # The budget ranks a group by its mean entry: the mean of s² orders filters (channels) by the
            # L2 norm of their scores, as the official structured layers do.
            return {name: score.detach().square() for name, score in self.tensors.items()}
        return {name: score.detach().abs() for name, score in self.tensors.items()}

    def flips(self, before: Mapping[str, torch.Tensor]) -> int:
        """How many mask entries differ from `before`."""
        masks = self.masks
        return sum(int((masks[name] != before[name]).sum()) for name in masks)


def grad_at_masked_weight(target: Target) -> torch.Tensor:
    """∂ℓ/∂z at z = m ⊙ θ from the last backward pass (a straight-through mask leaves it on θ)."""
    grad = target.dense.grad
    return torch.zeros_like(target.dense) if grad is None else grad.detach()


def straight_through(score: torch.Tensor, grad_mask: torch.Tensor) -> torch.Tensor:
    """∂ℓ/∂s when the top-k is the identity on the way back: ∂ℓ/∂m reaches |s|, then times sign(s)."""
    return score.detach().sign().mul_(grad_mask)


class RecordEpochs(Callback):
    """ctx.record at the end of each epoch of a phase, with how many mask entries flipped in it."""

    def __init__(self, ctx: PruneContext, phase: str, scores: Scores | None = None):
        self.ctx = ctx
        self.phase = phase
        self.scores = scores
        self.masks_before: Mapping[str, torch.Tensor] = {}

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.scores is not None:
            self.masks_before = self.scores.masks

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        event: dict[str, Any] = {"phase": self.phase, **metrics}
        if self.scores is not None:
            event["mask_flips"] = self.scores.flips(self.masks_before)
            self.masks_before = self.scores.masks
        self.ctx.record(**event)


def finetune(ctx: PruneContext, masks: Mapping[str, torch.Tensor], config: TrainConfig, epochs: int) -> None:
    """Train the weights under fixed masks (pruned weights stay exactly zero); nothing when epochs is 0."""
    if epochs:
        train_under_masks(ctx, masks, replace(config, epochs=epochs), [RecordEpochs(ctx, "finetune")])
