"""Gradual magnitude pruning during training, shared by DPF (`dpf.py`) and GMP (`gmp.py`).

Both train in one pass with prunekit's Trainer. Every `p` optimizer steps the mask is recomputed
from the magnitudes of the weights at the sparsity of the cubic schedule of Zhu & Gupta (2017),

    s_t = s_f · (1 − (1 − (t − t₀)/(t_end − t₀))³)   for t₀ ≤ t ≤ t_end,   s_t = s_f after t_end,

under the prune's budget (global by default; layerwise with budget="uniform"; whole filters with
structure="filters"). The two methods differ only in what a pruned weight is:

- DPF: the mask is applied straight-through, so a pruned weight keeps its dense value and its
  gradient, and it comes back when its magnitude grows above the threshold (feedback);
- GMP: the mask is applied with masked gradients and pruned weights are zeroed, and the selection
  ranks only the weights still kept, so a pruned weight never returns.

Each recomputation is recorded (`PruneResult.history`) with its churn: how many weights were
pruned, how many came back, how much of the new mask was already kept, and the pruning error δ
(the share of the dense weights' energy outside the mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from ..hparams import group, integer, number, setting
from ..masks import MASKED, attach_masks
from ..schedules import StepSchedule
from ..targets import Target
from ..training import Callback, TrainConfig, Trainer
from . import PruneContext
from ._stages import Criterion, Stages
from ._training import train


@dataclass
class GradualHparams:
    """Training (`training`) plus the pruning schedule; start and end are fractions of training."""

    training: TrainConfig = group(TrainConfig)
    p: int = setting(16, "recompute the mask every p optimizer steps (>= 1; the DPF paper uses 16)", integer(1))
    start: float = setting(0.0, "fraction of training at which the sparsity starts rising from 0, in [0, 1)",
                           number(0, 1, high_open=True))
    end: float = setting(0.75, "fraction of training at which the sparsity reaches the target, in [start, 1]",
                         number(0, 1))

    def check_relations(self) -> None:
        if not self.start <= self.end:
            raise PrunekitError(f"end={self.end!r} is invalid: the schedule must end after it starts "
                                f"(start={self.start}) and by the end of training; set end in [{self.start}, 1]")


def check_gradual_budget(ctx: PruneContext, hp: GradualHparams) -> None:
    """A sparsity that rises over training needs a budget whose sparsity can vary."""
    budget = ctx.budget
    if budget.fixed_sparsity is not None:
        raise PrunekitError(f"gradual pruning raises the sparsity over training, but {budget.n}:{budget.m} sparsity "
                            f"is fixed at {budget.fixed_sparsity:g}; use structure unstructured or filters, or prune "
                            "N:M one-shot with method magnitude")


def train_with_gradual_masks(ctx: PruneContext, hp: GradualHparams, *, mode: str, score: Criterion,
                             monotone: bool, keep_updating: bool) -> dict[str, torch.Tensor]:
    """Train `ctx.model` once while the masks follow the schedule; returns the final masks (at the target).

    `mode` is the masks' gradient mode during training, `score` ranks the weights at each update,
    `monotone` ranks the pruned below every survivor (masks only shrink), and `keep_updating` says
    whether the mask is still recomputed (at the target) after the schedule ends.
    """
    callback = GradualMasks(ctx, hp, mode, score, monotone, keep_updating)
    # Attached before the Trainer builds its optimizer; later updates only change the mask buffers.
    attach_masks(ctx.model, callback.stages.masks, mode)
    train(ctx, hp.training, [callback])
    return callback.stages.masks


class GradualMasks(Callback):
    """Recomputes the masks on the schedule at the start of a step and records the churn."""

    def __init__(self, ctx: PruneContext, hp: GradualHparams, mode: str, score: Criterion, monotone: bool,
                 keep_updating: bool) -> None:
        self.ctx = ctx
        self.hp = hp
        self.stages = Stages(ctx, monotone)
        self.mode = mode
        self.score = score
        self.keep_updating = keep_updating
        self.schedule: StepSchedule | None = None
        self.scheduled = 0.0  # the sparsity of the last update; the starting masks keep everything

    def on_train_begin(self, trainer: Trainer) -> None:
        total = trainer.total_steps
        self.schedule = StepSchedule(self.ctx.sparsity, start=round(self.hp.start * total),
                                     end=round(self.hp.end * total), shape="cubic")

    def on_step_begin(self, trainer: Trainer, batch) -> None:
        if self._due(trainer.step):
            self._update(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        # The schedule may end with training (end=1) or training may stop early: finish at the target.
        if self.scheduled != self.ctx.sparsity:
            self._update(trainer, self.ctx.sparsity)

    def _due(self, step: int) -> bool:
        if step > self.schedule.end:
            return self.keep_updating and step % self.hp.p == 0
        return step % self.hp.p == 0 or step == self.schedule.end  # the end is always hit exactly

    def _update(self, trainer: Trainer, sparsity: float | None = None) -> None:
        self.scheduled = self.schedule(trainer.step) if sparsity is None else sparsity
        new = self.stages.select(self.score(self.stages.masks), self.scheduled)
        attach_masks(self.ctx.model, new, self.mode)
        if self.mode == MASKED:
            _clear_optimizer_state(trainer.optimizer, self.ctx.targets, new)
        self.stages.record(step=trainer.step, epoch=trainer.epoch, scheduled=self.scheduled,
                           pruning_error=_pruning_error(self.ctx.targets, new))


def dense_square_magnitude(targets: list[Target]) -> Criterion:
    """w² of the dense weights, pruned ones included (which DPF's feedback may bring back).

    Squared, so that a group's mean score (structure="filters") ranks filters by their L2 norm.
    """
    return lambda masks: {t.name: t.dense.detach().square() for t in targets}


def _pruning_error(targets: list[Target], masks: dict[str, torch.Tensor]) -> float:
    """δ = ‖w − m ⊙ w‖² / ‖w‖² over the dense weights: the share of their energy the mask leaves out.

    DPF's convergence bounds grow with it (Lin et al. 2020); a pruned weight's gradient is taken
    with the weight at zero, so nothing pulls it back and δ shows when pruned weights drift away.
    GMP zeroes what it prunes, so its δ is 0.
    """
    with torch.no_grad():
        left_out = sum(float(t.dense.masked_select(~masks[t.name]).square().sum()) for t in targets)
        total = sum(float(t.dense.square().sum()) for t in targets)
    return left_out / total if total else 0.0


def _clear_optimizer_state(optimizer: torch.optim.Optimizer, targets: list[Target],
                           masks: dict[str, torch.Tensor]) -> None:
    """Zero the momentum (and Adam moments) of pruned weights.

    A masked weight gets no gradient and is zero, but the momentum it gathered before it was pruned
    would still move it off zero; clearing it keeps a pruned weight at exactly zero.
    """
    for target in targets:
        state = optimizer.state.get(target.dense, {})
        keep = masks[target.name].to(target.dense.dtype)
        for value in state.values():
            if torch.is_tensor(value) and value.shape == keep.shape:
                value.mul_(keep)
