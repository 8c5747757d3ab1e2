"""The baselines of DPF: gradual magnitude pruning (GMP) and one-shot pruning with fine-tuning.

GMP (Zhu & Gupta, "To prune, or not to prune", 2017) uses DPF's schedule and selection exactly:
every p steps the mask is recomputed by magnitude at the cubic schedule's sparsity. But pruned
weights are zeroed and get no gradient, and each update ranks only the weights still kept, so the
mask only shrinks and nothing comes back: the no-feedback ablation of DPF. Zhu & Gupta's
TensorFlow code thresholds the raw weight variables, whose pruned entries no longer learn, so in
practice its masks only shrink too; ranking the kept weights makes that exact. Their paper prunes
each layer to the same sparsity: budget="uniform" here; the default global budget matches DPF's.

One-shot + fine-tuning (Han et al., "Learning both Weights and Connections", 2015): train dense,
prune once by magnitude, then fine-tune the survivors with the mask fixed; the two phases share
the epoch budget of the other methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from ..errors import PrunekitError
from ..masks import MASKED, attach_masks
from ..targets import Target
from ..training import TrainConfig
from . import PruneContext, register
from ._gradual import GradualHparams, check_gradual_budget, train_with_gradual_masks
from ._training import masked_fraction, train

PRUNED = -1.0  # below every w², so a pruned weight is never chosen again


@dataclass
class GMPHparams(GradualHparams):
    """Training settings and the schedule (p, start, end); after the end the mask no longer changes."""


def kept_magnitude(target: Target, kept: torch.Tensor) -> torch.Tensor:
    """w² of the weights still kept; pruned ones rank last, so the mask only shrinks."""
    return torch.where(kept, target.dense.detach().square(), PRUNED)


@register("gmp", GMPHparams, "gradual magnitude pruning: DPF's schedule without feedback, pruned weights "
          "stay zero (Zhu & Gupta 2017)", needs_data=True)
def gmp(ctx: PruneContext, hp: GMPHparams) -> dict[str, torch.Tensor]:
    check_gradual_budget(ctx.budget, "gmp")
    # Masked gradients: a pruned weight is zero, gets no gradient, and its momentum is cleared.
    # Once the target is reached the kept weights are all that can be ranked, so updates stop.
    return train_with_gradual_masks(ctx, hp, mode=MASKED, score=kept_magnitude, keep_updating=False)


@dataclass
class OneShotFinetuneHparams(TrainConfig):
    """Training settings for the whole budget, split into a dense phase and a fine-tuning phase."""

    prune_at: float = field(default=0.5, metadata={
        "help": "fraction of the epochs trained dense before the one-shot pruning; the rest fine-tunes, in (0, 1)"})
    finetune_lr_scale: float = field(default=1.0, metadata={
        "help": "peak LR of the fine-tuning phase as a multiple of lr; 1 repeats the LR schedule "
                "(learning-rate rewinding, Renda et al. 2020), Han et al. 2015 fine-tune with a lower one"})

    def validate(self) -> None:
        super().validate()
        if not 0 < self.finetune_lr_scale < float("inf"):
            raise PrunekitError(f"finetune_lr_scale={self.finetune_lr_scale!r} is invalid: set it to a number > 0")
        if not 0 < self.prune_at < 1:
            raise PrunekitError(f"prune_at={self.prune_at!r} is invalid: set it to a fraction in (0, 1), e.g. 0.5")
        for name, phase in zip(("dense", "fine-tuning"), self.phases()):
            if phase.epochs < 1:
                raise PrunekitError(f"prune_at={self.prune_at} of {self.epochs} epochs leaves no {name} epoch; "
                                    "use at least 2 epochs, with round(prune_at × epochs) between 1 and epochs − 1")
            try:
                phase.validate()
            except PrunekitError as error:
                raise PrunekitError(f"the {name} phase ({phase.epochs} epochs): {error}") from None

    def phases(self) -> tuple[TrainConfig, TrainConfig]:
        """The dense training and the fine-tuning, as plain training settings."""
        dense_epochs = round(self.prune_at * self.epochs)
        plain = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})
        return (replace(plain, epochs=dense_epochs),
                replace(plain, epochs=self.epochs - dense_epochs, lr=self.lr * self.finetune_lr_scale))


@register("oneshot-ft", OneShotFinetuneHparams, "train dense, prune once by magnitude, fine-tune the rest of "
          "the epochs with the mask fixed (Han et al. 2015)", needs_data=True)
def oneshot_finetune(ctx: PruneContext, hp: OneShotFinetuneHparams) -> dict[str, torch.Tensor]:
    dense_phase, finetune_phase = hp.phases()
    train(ctx, dense_phase)
    # w², as DPF and GMP rank: the same weights for unstructured budgets, filters by L2 norm for structured ones.
    masks = ctx.select({t.name: t.dense.detach().square() for t in ctx.targets})
    attach_masks(ctx.model, masks, MASKED)
    ctx.record(epoch=dense_phase.epochs, sparsity=masked_fraction(masks))
    train(ctx, finetune_phase)
    return masks
