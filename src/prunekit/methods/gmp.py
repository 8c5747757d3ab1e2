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

from dataclasses import dataclass, replace

import torch

from ..errors import PrunekitError
from ..hparams import group, number, one_of, setting, validate
from ..masks import MASKED, attach_masks
from ..training import TrainConfig
from . import PruneContext, register
from ._criteria import CRITERIA
from ._gradual import GradualHparams, check_gradual_budget, dense_square_magnitude, train_with_gradual_masks
from ._stages import Stages
from ._training import train


@dataclass
class GMPHparams(GradualHparams):
    """Training settings, the schedule (p, start, end) and the score; after the end the mask no longer changes."""

    score: str = setting("magnitude", "what ranks the weights at each mask update: magnitude (w², Zhu & Gupta) or "
                         "another scoring method's score at the network as it is then (its default settings)",
                         one_of(*CRITERIA))


@register("gmp", GMPHparams, "gradual magnitude pruning: DPF's schedule without feedback, pruned weights "
          "stay zero (Zhu & Gupta 2017); any scoring method's score with --score", needs_data=True, family="training",
          check=check_gradual_budget)
def gmp(ctx: PruneContext, hp: GMPHparams) -> dict[str, torch.Tensor]:
    # Masked gradients: a pruned weight is zero, gets no gradient, and its momentum is cleared. The
    # ranking is monotone (the pruned rank last), so once the target is reached the mask stops changing.
    return train_with_gradual_masks(ctx, hp, mode=MASKED, score=CRITERIA[hp.score](ctx), monotone=True,
                                    keep_updating=False)


@dataclass
class OneShotFinetuneHparams:
    """Training settings for the whole budget, split into a dense phase and a fine-tuning phase."""

    training: TrainConfig = group(TrainConfig)
    prune_at: float = setting(0.5, "fraction of the epochs trained dense before the one-shot pruning; the rest "
                              "fine-tunes, in (0, 1)", number(0, 1, low_open=True, high_open=True))
    finetune_lr_scale: float = setting(1.0, "peak LR of the fine-tuning phase as a multiple of lr; 1 repeats the LR "
                                       "schedule (learning-rate rewinding, Renda et al. 2020), Han et al. 2015 "
                                       "fine-tune with a lower one", number(0, low_open=True))

    def check_relations(self) -> None:
        for name, phase in zip(("dense", "fine-tuning"), self.phases()):
            if phase.epochs < 1:
                raise PrunekitError(f"prune_at={self.prune_at} of {self.training.epochs} epochs leaves no {name} "
                                    "epoch; use at least 2 epochs, with round(prune_at × epochs) between 1 and "
                                    "epochs − 1")
            try:
                validate(phase)
            except PrunekitError as error:
                raise PrunekitError(f"the {name} phase ({phase.epochs} epochs): {error}") from None

    def phases(self) -> tuple[TrainConfig, TrainConfig]:
        """The dense training and the fine-tuning, as plain training settings."""
        dense_epochs = round(self.prune_at * self.training.epochs)
        return (replace(self.training, epochs=dense_epochs),
                replace(self.training, epochs=self.training.epochs - dense_epochs,
                        lr=self.training.lr * self.finetune_lr_scale))


@register("oneshot-ft", OneShotFinetuneHparams, "train dense, prune once by magnitude, fine-tune the rest of "
          "the epochs with the mask fixed (Han et al. 2015)", needs_data=True, family="training")
def oneshot_finetune(ctx: PruneContext, hp: OneShotFinetuneHparams) -> dict[str, torch.Tensor]:
    dense_phase, finetune_phase = hp.phases()
    train(ctx, dense_phase)
    stages = Stages(ctx)
    # w², as DPF and GMP rank: the same weights for unstructured budgets, filters by L2 norm for structured ones.
    masks = stages.select(dense_square_magnitude(ctx.targets)(stages.masks), ctx.sparsity)
    attach_masks(ctx.model, masks, MASKED)
    stages.record(epoch=dense_phase.epochs)
    train(ctx, finetune_phase)
    return masks
