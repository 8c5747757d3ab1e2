"""The stage engine: masks reached through a sequence of selections, written once for every method.

One-shot pruning is one stage; IMP rounds, SynFlow's iterations, WoodFisher's recompute steps,
CHITA++ stages and the mask updates of gradual pruning (GMP, DPF) are several. Each stage

    starts from the masks of the previous one (the first from everything kept),
    ranks what earlier stages pruned below every survivor (`monotone`: masks only shrink),
    selects exactly the planned count at the stage's sparsity,
    and records the stage with its achieved sparsity and churn (pruned, reactivated, overlap).

Stage scores must be non-negative (magnitudes, saliencies): the pruned then rank at `PRUNED`, below
all of them. A method whose solver chooses the support itself (CHITA) hands its masks to `accept`
instead of scores to `select`. Any scoring method runs one-shot, iteratively (`StageSettings`) or
gradually during training (`_gradual.py`), because all three are this loop.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import hparams
from ..errors import PrunekitError
from ..masks import MASKED, attach_masks, mask_sparsity
from ..schedules import STAGE_SCHEDULES, stage_sparsities
from ..targets import Target
from . import PruneContext

Masks = dict[str, torch.Tensor]
# A method's scores of every target at the network as it is, given the current masks (non-negative).
Criterion = Callable[[Masks], Mapping[str, torch.Tensor]]
PRUNED = -1.0  # the rank of a weight an earlier stage pruned: below every non-negative score


def all_kept(targets: Sequence[Target]) -> Masks:
    return {t.name: torch.ones(t.shape, dtype=torch.bool, device=t.dense.device) for t in targets}


def within_survivors(masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor]) -> Masks:
    """Scores where pruned weights rank below every survivor, so a new mask keeps only survivors.

    A survivor can have a zero score too; ranking the pruned at -1 keeps ties from reviving them.
    """
    return {name: torch.where(masks[name], score, torch.full_like(score, PRUNED)) for name, score in scores.items()}


def churn(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Weights a selection pruned and reactivated, and the fraction of its kept weights that were kept before."""
    pruned = sum(int((old[n] & ~new[n]).sum()) for n in new)
    reactivated = sum(int((~old[n] & new[n]).sum()) for n in new)
    kept = sum(int(new[n].sum()) for n in new)
    return {"pruned": pruned, "reactivated": reactivated, "overlap": (kept - reactivated) / max(kept, 1)}


class Stages:
    """The masks of a prune as they go through its stages, each recorded in the prune's history."""

    def __init__(self, ctx: PruneContext, monotone: bool = True) -> None:
        self.ctx = ctx
        self.monotone = monotone
        self.masks = all_kept(ctx.targets)
        self.churn: dict[str, float] = {}

    def select(self, scores: Mapping[str, torch.Tensor], sparsity: float) -> Masks:
        """The stage's masks: exactly the plan's count at `sparsity`, the earlier pruned last if monotone."""
        if not any(bool(score.ne(0).any()) for score in scores.values()):
            raise PrunekitError(
                "every weight's score is 0, so the selection would go by position alone: a gradient-based score "
                "(snip, grasp) finds no gradient at these weights, as under loss='distill' at the dense model, whose "
                "outputs it matches exactly; score with magnitude, obd, woodfisher or chita, or pass another loss")
        ranked = within_survivors(self.masks, scores) if self.monotone else scores
        with torch.no_grad():
            return self.accept(self.ctx.select(dict(ranked), sparsity))

    def accept(self, masks: Masks) -> Masks:
        """Masks a solver chose itself become the stage's masks."""
        self.churn = churn(self.masks, masks)
        self.masks = masks
        return masks

    def record(self, **event: Any) -> None:
        """Log the stage with its achieved sparsity and churn (and the cost so far, via ctx.record)."""
        self.ctx.record(**event, sparsity=mask_sparsity(self.masks), **self.churn)


def run_stages(ctx: PruneContext, sparsities: Sequence[float], score: Criterion,
               after: Callable[[Masks], Mapping[str, Any] | None] | None = None, label: str = "stage",
               first: int = 0) -> Masks:
    """The common loop: at each sparsity score the model under the current masks, select, run `after`, record.

    Between stages the masks are attached, so that each stage scores the network the previous one
    left. Stages are numbered from `first` under `label` in the history (IMP counts rounds from 1).
    """
    stages = Stages(ctx)
    for index, sparsity in enumerate(sparsities, start=first):
        if index > first:
            attach_masks(ctx.model, stages.masks, MASKED)
        masks = stages.select(score(stages.masks), sparsity)
        event = (after(masks) if after is not None else None) or {}
        stages.record(**{label: index, "scheduled": sparsity, **event})
    return stages.masks


@dataclass
class StageSettings:
    """How many stages reach the target, on which schedule: 1 is one-shot, more is iterative pruning."""

    stages: int = hparams.setting(1, "selections on the way to the target, each rescoring the survivors "
                                     "(1: one-shot)", hparams.integer(1))
    stage_schedule: str = hparams.setting("geometric", "sparsities of the stages: "
                                          f"{', '.join(STAGE_SCHEDULES)} (geometric: the same fraction of the "
                                          "survivors each stage)", hparams.one_of(*STAGE_SCHEDULES))

    def sparsities(self, target: float) -> list[float]:
        return stage_sparsities(target, self.stages, self.stage_schedule, base=0.0)
