"""Hydra (Sehwag, Wang, Mittal and Jana, "HYDRA: Pruning Adversarially Robust Neural Networks",
NeurIPS 2020) with its natural training loss, the baseline the BiP paper compares against.

    scores:  s = sqrt(6 / fan_in) · w / max|w|, per layer       (Hydra's scaled initialisation, ∝ w)
    phase 1: s ← s − α ∂ℓ(m ⊙ w)/∂s,  m = top-k of |s|          (the weights w stay frozen)
    phase 2: the weights are fine-tuned under the final mask.
∂ℓ/∂m passes straight through the top-k to the scores (see `_scores.py`); the mask is recomputed
after every step. BiP is this method with a weight step interleaved in every iteration.

Choices: the budget decides the top-k (global for unstructured by default, as the BiP repository
runs Hydra; `budget="uniform"` keeps k per layer as Hydra's own code does). In phase 1 only the
scores move: Hydra's freeze helper skips BatchNorm, so its affine parameters train there too;
running statistics follow the current mask (training mode) in both. The training fields set both
phases, as the BiP repository's hydra.yml and finetune.yml share them (SGD 0.1 cosine, momentum 0.9,
weight decay 5e-4, also applied to the scores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from ..hparams import group, integer, setting
from ..targets import Target
from ..training import Callback, TrainConfig, Trainer
from . import PruneContext, register
from ._scores import RecordEpochs, Scores, finetune, grad_at_masked_weight, straight_through
from ._training import train


@dataclass
class HydraHparams:
    """`training` configures both phases: `epochs` trains the scores, `finetune_epochs` the weights."""

    training: TrainConfig = group(TrainConfig, help={
        "epochs": "epochs of training the scores with the weights frozen (>= 1)"})
    finetune_epochs: int = setting(10, "epochs of training the weights under the learned mask (>= 0; 0: scores "
                                   "only)", integer(0))


@register("hydra", HydraHparams, "learn top-k scores with the weights frozen, then fine-tune (Sehwag et al. 2020)",
          needs_data=True, family="training")
def hydra(ctx: PruneContext, hp: HydraHparams) -> dict[str, torch.Tensor]:
    scores = Scores(ctx, {t.name: scaled_scores(t) for t in ctx.targets})
    scores.project()
    train(ctx, hp.training, [ScoreStep(ctx, scores), RecordEpochs(ctx, "scores", scores)],
          params=list(scores.tensors.values()))
    finetune(ctx, scores.masks, hp.training, hp.finetune_epochs)
    return scores.masks


def scaled_scores(target: Target) -> torch.Tensor:
    """sqrt(6 / fan_in) · w / max|w|: proportional to the weights, at the scale of a Kaiming-uniform init."""
    weight = target.dense.detach()
    largest = weight.abs().max()
    if largest == 0:
        raise PrunekitError(f"hydra scales its scores by 1/max|w|, but {target.name} is all zeros; "
                            f"leave it out with --exclude {target.name!r}")
    fan_in = weight[0].numel()
    return math.sqrt(6 / fan_in) * weight / largest


class ScoreStep(Callback):
    """Gives the scores their straight-through gradient before each step and re-projects the mask after it."""

    def __init__(self, ctx: PruneContext, scores: Scores):
        self.ctx = ctx
        self.scores = scores

    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        for target in self.ctx.targets:
            score = self.scores.tensors[target.name]
            score.grad = straight_through(score, target.dense.detach() * grad_at_masked_weight(target))

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self.scores.project()
