"""BiP: pruning as bi-level optimization (Zhang et al., "Advancing Model Pruning via Bi-level
Optimization", NeurIPS 2022).

    upper:  min_m  ℓ(m ⊙ θ*(m))          m: the top-k mask of the scores
    lower:  θ*(m) = argmin_θ ℓ(m ⊙ θ)

Algorithm A1, one iteration on two independent mini-batches:
  1. lower level, one SGD step on the weights through the binary mask z*:
         θ ← θ − β ∇_θ ℓ(z* ⊙ θ),   ∇_θ ℓ = z* ⊙ ∂ℓ/∂z
  2. upper level, one SGD step on the scores at the new weights, with the implicit gradient (IG):
         s ← s − α [∇_m ℓ(m ⊙ θ) − (1/γ) ∇_z ℓ ⊙ ∇_θ ℓ]     (the paper's term, `implicit_gradient=paper`)
  3. projection: z* = top-k of |s|, exactly k entries (global for unstructured budgets).
∇_m ℓ passes straight through the top-k to the scores (see `_scores.py`). The IG comes from the
implicit function theorem with ∇²_θθ ℓ ≈ 0 and ∇²_mθ ℓ ≈ diag(∇_z ℓ); it is always ≤ 0.

Choices, and where the official code (OPTML-Group/BiP) differs:
- Scores start as a signed copy of the pretrained weights, so the first mask is global magnitude.
  The official `initialize_scaled_score` assigns `popup_scores.data = weight.data`, which makes the
  scores and the weights one tensor for the rest of the run; here they are the paper's two variables.
- `implicit_gradient=code` is the official term, −lr2 · (∂ℓ/∂s)², added to ∂ℓ/∂s (its two factors are
  the same gradient, see research notes §1.5); `paper` adds −(1/γ) ∂ℓ/∂z ⊙ (m ⊙ ∂ℓ/∂z) to ∂ℓ/∂m,
  which then takes the sign of s like the rest of ∂ℓ/∂m; `off` leaves alternating SGD.
- The lower level changes kept weights only, as the paper's step does: its weight decay and momentum
  are undone at pruned positions, which keep their values until the scores bring them back (the
  official optimizer decays every weight).
- Biases and BatchNorm affine parameters belong to the lower level; the score optimizer holds only
  the scores (the official one also steps BatchNorm). Both levels run the network in training mode,
  so BatchNorm statistics follow the current mask, as in the official code.
- Filter-wise (structure="filters"), a pruned filter's channel reaches a train-mode batch norm
  with zero variance, as in the official code, so its score gradient is ~1/√eps times the kept
  filters' (or zero where the ReLU cuts the constant β) and the mask churns.
  `pruned_channel_bn=running` normalises such a channel with its running statistics instead
  (`_pruned_bn.py`; not in the paper or the code; measured in benchmarks/RESULTS.md).
- The upper level needs one backward pass (the official code makes two identical ones), so an
  iteration costs two forward and backward passes. The lower level runs the masks with masked
  gradients (autograd gives z* ⊙ ∂ℓ/∂z), the upper level straight-through (∂ℓ/∂z of every weight);
  the projection finds the exact top-k near the last one (`_topk.py`) and writes it into the
  masks already attached. Per example through a backward pass BiP costs 1.1–1.3× plain masked
  training on LeNet-300 (the projection, the upper gradient and the restore are passes over
  every score that the small layers do not hide) and about 1× on ResNet-20
  (benchmarks/RESULTS.md, `benchmarks/bip_step_cost.py`).
- The upper level's batches come from a second pass over the data per epoch (see `_upper_level_pass`),
  like the official code's second loader over the training set.
- Learning rates and schedules follow the official CIFAR config as it runs: 0.1 for both, cosine for
  the weights, step (×0.1 at 50% and 75%) for the scores, momentum 0.9, weight decay 1e-4.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from ..errors import PrunekitError
from ..hparams import Check, group, integer, number, one_of, setting
from ..masks import MASKED, STRAIGHT_THROUGH
from ..objectives import to_device
from ..training import LR_SCHEDULES, Callback, TrainConfig, Trainer, lr_multiplier
from . import PruneContext, register
from ._pruned_bn import RunningStatsForPrunedChannels
from ._scores import RecordEpochs, Scores, finetune, grad_at_masked_weight, straight_through
from ._training import train

IMPLICIT_GRADIENTS = ("paper", "code", "off")
PRUNED_CHANNEL_BN = ("batch", "running")


@dataclass
class BipHparams:
    """`training` configures the lower level (the weights); the score_* fields the upper level."""

    training: TrainConfig = group(TrainConfig, help={
        "epochs": "epochs of bi-level iterations (>= 1); each is two passes over the data, one per level",
        "lr": "lower-level (weight) peak learning rate (> 0)",
        "weight_decay": "L2 penalty on the kept weights in the lower level (>= 0)"},
        epochs=10, lr=0.1, weight_decay=1e-4)
    score_lr: float = setting(0.1, "upper-level (score) SGD learning rate (> 0)", number(0, low_open=True))
    score_lr_schedule: str = setting("step", "score LR decay: 'cosine', 'step' (at lr_milestones by lr_gamma) or "
                                     "'constant'", one_of(*LR_SCHEDULES))
    score_weight_decay: float = setting(1e-4, "L2 penalty on the scores (>= 0)", number(0))
    implicit_gradient: str = setting("paper", "implicit-gradient term of the upper level: 'paper' "
                                     "(-(1/γ)·∇_zℓ⊙∇_θℓ), 'code' (the official code's -lr2·(∂ℓ/∂s)²) or 'off'",
                                     one_of(*IMPLICIT_GRADIENTS))
    ig_scale: float = setting(1e-4, "1/γ of the paper's implicit gradient (lr2 of the official code), > 0",
                              Check("a finite number > 0 (implicit_gradient=off turns the term off)",
                                    number(0, low_open=True)))
    finetune_epochs: int = setting(0, "epochs of training the weights under the final mask afterwards (>= 0; 0: "
                                   "none)", integer(0))
    pruned_channel_bn: str = setting("batch", "structure=filters: how the batch norm after a pruned filter "
                                     "normalises its zero channel while the masks are learned: 'batch' (the batch's "
                                     "statistics, as the official code; the zero variance scales the filter's "
                                     "gradient by 1/sqrt(eps)) or 'running' (its running statistics, kept as they were "
                                     "when it was pruned)", one_of(*PRUNED_CHANNEL_BN))


def _check(ctx: PruneContext, hp: BipHparams) -> None:
    _require_two_batches(ctx)
    if hp.pruned_channel_bn == "running" and ctx.budget.structure != "filters":
        raise PrunekitError(f"pruned_channel_bn='running' is for whole pruned filters, but the structure is "
                            f"{ctx.budget.structure!r}; use structure filters, or pruned_channel_bn batch "
                            "(--pruned-channel-bn)")


def _require_two_batches(ctx: PruneContext) -> None:
    try:
        batches = len(ctx.data)
    except TypeError:
        raise PrunekitError("bip needs data with len() (batches per epoch) for its LR schedules; pass a "
                            "prunekit Loader or a list of (inputs, targets) batches") from None
    if batches < 2:
        raise PrunekitError(f"bip takes two different mini-batches per iteration but the data has {batches} "
                            "batch per epoch; use a smaller batch size or more examples")


@register("bip", BipHparams, "bi-level optimization of a top-k mask and the weights (Zhang et al. 2022)",
          needs_data=True, family="training", check=_check)
def bip(ctx: PruneContext, hp: BipHparams) -> dict[str, torch.Tensor]:
    scores = search(ctx, hp)
    finetune(ctx, scores.masks, hp.training, hp.finetune_epochs)
    return scores.masks


def search(ctx: PruneContext, hp: BipHparams) -> Scores:
    """The bi-level iterations for `epochs` passes over the data; the model's weights are trained in place."""
    scores = Scores(ctx, {t.name: t.dense for t in ctx.targets})
    scores.project()
    pruned_channels = (RunningStatsForPrunedChannels(ctx.model, ctx.targets, lambda: scores.multipliers)
                       if hp.pruned_channel_bn == "running" else nullcontext())
    with pruned_channels:
        train(ctx, hp.training, [BilevelStep(ctx, scores, hp), RecordEpochs(ctx, "bilevel", scores)])
    return scores


class BilevelStep(Callback):
    """Algorithm A1 around the Trainer's step: that step is the lower level, this callback masks its
    gradient and adds the upper level and the projection after it."""

    def __init__(self, ctx: PruneContext, scores: Scores, hp: BipHparams):
        self.ctx = ctx
        self.scores = scores
        self.hp = hp
        self.optimizer = torch.optim.SGD(list(scores.tensors.values()), lr=hp.score_lr,
                                         momentum=hp.training.momentum, weight_decay=hp.score_weight_decay)
        score_schedule = replace(hp.training, lr_schedule=hp.score_lr_schedule)
        steps_per_epoch = len(ctx.data)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(score_schedule, step, steps_per_epoch))
        self.upper_batches: Iterator | None = None
        self.weights_before_step: dict[str, torch.Tensor] = {}

    def on_step_begin(self, trainer: Trainer, batch) -> None:
        if self.upper_batches is None:
            self.upper_batches = _upper_level_pass(self.ctx.data, self.hp.training.epochs + trainer.epoch)
        # Lower level: autograd through the binary mask gives ∇_θ ℓ(z* ⊙ θ) = z* ⊙ ∂ℓ/∂z itself.
        self.scores.set_gradient_mode(MASKED)

    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        for target in self.ctx.targets:
            self._remember(target.name, target.dense.detach())

    def _remember(self, name: str, weight: torch.Tensor) -> None:
        before = self.weights_before_step.get(name)
        if before is None:
            self.weights_before_step[name] = weight.clone()
        else:
            before.copy_(weight)  # into last step's copy: no allocation per step

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self._restore_pruned_weights()
        self._upper_level(trainer)
        self.scores.project()

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        metrics["score_lr"] = self.optimizer.param_groups[0]["lr"]
        self.upper_batches = None

    def _restore_pruned_weights(self) -> None:
        """Weight decay and momentum must not move pruned weights: the paper's step changes kept ones only."""
        multipliers = self.scores.multipliers
        with torch.no_grad():
            for target in self.ctx.targets:
                # With weights of exactly 0 and 1, lerp is exact: the stepped value where kept, the
                # value before the step where pruned (a float where(), without a boolean mask).
                torch.lerp(self.weights_before_step[target.name], target.dense, multipliers[target.name],
                           out=target.dense)

    def _upper_level(self, trainer: Trainer) -> None:
        """One SGD step on the scores at θ_{t+1}, on a batch independent of the lower level's."""
        batch = to_device(next(self.upper_batches), trainer.device)
        self.scores.set_gradient_mode(STRAIGHT_THROUGH)  # ∂ℓ/∂z of every weight, pruned ones included
        self.ctx.model.zero_grad(set_to_none=True)
        trainer.objective.loss(self.ctx.model, batch)[0].backward()  # the lower level's objective
        multipliers = self.scores.multipliers
        for target in self.ctx.targets:
            score = self.scores.tensors[target.name]
            score.grad = upper_gradient(score, target.dense.detach(), multipliers[target.name],
                                        grad_at_masked_weight(target), self.hp.implicit_gradient, self.hp.ig_scale)
        self.optimizer.step()
        self.scheduler.step()


def upper_gradient(score: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, grad_z: torch.Tensor,
                   implicit_gradient: str, ig_scale: float) -> torch.Tensor:
    """∂ℓ/∂s of the upper level, given ∂ℓ/∂z at z = m ⊙ θ, with the chosen implicit-gradient term."""
    grad_mask = weight * grad_z                                          # ∇_m ℓ(m ⊙ θ)
    if implicit_gradient == "paper":
        grad_mask.addcmul_(mask * grad_z, grad_z, value=-ig_scale)       # − (1/γ) ∇_z ℓ ⊙ ∇_θ ℓ
    grad_score = straight_through(score, grad_mask)
    if implicit_gradient == "code":
        grad_score.addcmul_(grad_score, grad_score, value=-ig_scale)     # − lr2 (∂ℓ/∂s)²
    return grad_score


def _upper_level_pass(data: Iterable, pass_number: int) -> Iterator:
    """Another pass over the data for the upper level, so that each iteration draws two different batches.

    A loader with `set_epoch` (prunekit's Loader) is reshuffled for it with a pass number the lower
    level never uses, as the official code's second loader is; the pass also starts one batch later
    and wraps round, so that data in a fixed order (a list of batches) pairs every batch with another.
    """
    set_epoch = getattr(data, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(pass_number)
    batches = iter(data)
    first = next(batches)
    yield from batches
    yield first

