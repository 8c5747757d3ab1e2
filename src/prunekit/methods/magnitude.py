"""Magnitude pruning (one-shot, OMP) and the random control.

Global vs layerwise, ERK, N:M and filter/channel groups are all budget settings, so each method
is only its score: |w| for magnitude, uniform noise for random.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import PruneContext, register
from ._stages import Criterion


@dataclass(frozen=True)
class MagnitudeHparams:
    """Magnitude pruning has no hyperparameters of its own; the budget says where to prune."""


@register("magnitude", MagnitudeHparams, "remove the weights of smallest |w| (global, layerwise, ERK, N:M or structured)")
def magnitude(ctx: PruneContext, hp: MagnitudeHparams) -> dict[str, torch.Tensor]:
    return ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets})


@dataclass(frozen=True)
class RandomHparams:
    """Random pruning has no hyperparameters; --seed chooses the mask."""


@register("random", RandomHparams, "remove weights uniformly at random (a control: any method should beat it)")
def random(ctx: PruneContext, hp: RandomHparams) -> dict[str, torch.Tensor]:
    return ctx.select(random_criterion(ctx)(None))


def random_criterion(ctx: PruneContext) -> Criterion:
    """Uniform noise drawn from prune()'s seed: the same ranking at every call."""
    def score(masks) -> dict[str, torch.Tensor]:
        generator = ctx.generator()
        return {t.name: torch.rand(t.shape, generator=generator).to(t.dense.device) for t in ctx.targets}

    return score
