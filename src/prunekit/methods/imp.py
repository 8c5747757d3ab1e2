"""Magnitude pruning with retraining: IMP (iterative, lottery tickets) and OMP (one-shot).

IMP: Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks", ICLR 2019, with rewinding to an early checkpoint as in Frankle et al., "Linear Mode
Connectivity and the Lottery Ticket Hypothesis", ICML 2020, and Ma et al., "Sanity Checks for
Lottery Tickets", NeurIPS 2021 (the IMP that BiP compares with); LR rewinding as in Renda et al.,
"Comparing Rewinding and Fine-tuning in Neural Network Pruning", ICLR 2020.

    θ ← train(θ_0), keeping θ_k                       (or: the model given is already trained)
    for r = 1 … R:   s_r = 1 − (1 − rate)^r, the last round stopping at the target
        m_r ← prune the smallest |θ| among the weights m_{r−1} keeps, round(s_r · N) zeros in all
        θ   ← θ_k  (weight rewinding)   or   θ  (LR rewinding: keep the weights, restart the schedule)
        θ   ← train(m_r ⊙ θ) under m_r, the full schedule again; record (r, s_r) and the cost so far

OMP is the same with a single round straight to the target. Every round is recorded with its
cumulative cost, and `prune(observer=...)` sees the model after each one, so one IMP run yields
every sparsity level on its way. Counts are the budget's: round s_r sets exactly round(s_r · N)
zeros (N = prunable weights, s_r from `prunekit.schedules.imp_rounds`), and each round's zeros
include the previous round's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..checkpoints import load_state_dict_into, plain_state_dict, read_state_dict
from ..errors import PrunekitError
from ..hparams import group, number, one_of, setting
from ..schedules import imp_rounds
from ..training import Callback, TrainConfig, Trainer
from . import PruneContext, register
from ._stages import run_stages
from ._training import require_training_data, train, train_under_masks

REWINDS = ("weights", "lr")
State = dict[str, Tensor]


@dataclass
class RetrainHparams:
    """How each retraining runs (`training`: epochs per round, lr, schedule, ...) and where it starts.

    The model given to prune() is the trained dense model, unless `train_dense` says it is an
    initialisation. Training is seeded by prune()'s seed.
    """

    training: TrainConfig = group(TrainConfig, help={
        "epochs": "epochs of each training: every round's retraining, and the dense training with train_dense"})
    rewind: str = setting("weights", "weights: survivors go back to the rewind point before each retraining "
                          "(weight rewinding); lr: survivors keep their trained values and the LR schedule starts "
                          "again (LR rewinding; with a small constant lr this is fine-tuning)", one_of(*REWINDS))
    rewind_epoch: float = setting(1.0, "with train_dense: the point of the dense training (in epochs, may be "
                                  "fractional) whose weights are the rewind point; 0 is the initialisation, as in "
                                  "the original lottery ticket", number(0))
    rewind_weights: str | None = setting(None, "file with the weights at the rewind point of the training that "
                                         "produced the given model (safetensors or torch state dict); without it "
                                         "(and without train_dense) weight rewinding returns the survivors to the "
                                         "given trained weights")
    train_dense: bool = setting(False, "the model given is an initialisation: train it dense for `epochs` first "
                                "(recorded as round 0, its cost counted) and take the rewind point from that run")

    def check_relations(self) -> None:
        epochs = self.training.epochs
        if self.train_dense and self.rewind == "weights" and not self.rewind_epoch < epochs:
            raise PrunekitError(f"rewind_epoch={self.rewind_epoch!r} must be in [0, epochs={epochs}): "
                                "the rewind point lies inside the dense training")
        if self.rewind_weights is None:
            return
        if self.train_dense:
            raise PrunekitError("rewind_weights and train_dense both set the rewind point; give only one")
        if self.rewind == "lr":
            raise PrunekitError("rewind_weights is only used by weight rewinding; drop it or set rewind=weights")
        if not Path(self.rewind_weights).is_file():
            raise PrunekitError(f"rewind_weights file {self.rewind_weights} does not exist")


@dataclass
class ImpHparams(RetrainHparams):
    """IMP: each round prunes `rate` of the remaining weights, rewinds and retrains for `epochs`."""

    rate: float = setting(0.2, "fraction of the remaining weights pruned per round, in (0, 1)",
                          number(0, 1, low_open=True, high_open=True))


@dataclass
class OmpHparams(RetrainHparams):
    """OMP: one round of IMP, straight to the target sparsity.

    Without train_dense or rewind_weights both rewinds start from the trained survivors: that is
    fine-tuning with the LR schedule run again (a small constant lr makes it classic fine-tuning).
    """


def _check_rounds(ctx: PruneContext, hp: ImpHparams) -> None:
    if ctx.budget.fixed_sparsity is not None:
        raise PrunekitError("imp raises the sparsity round by round, but N:M sparsity is fixed; "
                            "use omp (one round) for N:M")
    require_training_data(ctx)


@register("imp", ImpHparams, "iterative magnitude pruning: prune 20% of the survivors, rewind, retrain; "
          "every round recorded with its cost", needs_data=True, family="training", check=_check_rounds)
def imp(ctx: PruneContext, hp: ImpHparams) -> dict[str, Tensor]:
    return prune_and_retrain(ctx, hp, imp_rounds(ctx.sparsity, hp.rate))


@register("omp", OmpHparams, "one-shot global magnitude on the trained model, then one retraining "
          "(rewind or fine-tune)", needs_data=True, family="training", check=lambda ctx, hp: require_training_data(ctx))
def omp(ctx: PruneContext, hp: OmpHparams) -> dict[str, Tensor]:
    return prune_and_retrain(ctx, hp, [ctx.sparsity])


def prune_and_retrain(ctx: PruneContext, hp: RetrainHparams, sparsities: list[float]) -> dict[str, Tensor]:
    """One round per sparsity: magnitude within the survivors, rewind, retrain under the mask, record."""
    rewind_point = _rewind_point(ctx, hp)

    def rewind_and_retrain(masks: dict[str, Tensor]) -> None:
        if rewind_point is not None:
            load_state_dict_into(ctx.model, rewind_point)
        train_under_masks(ctx, masks, hp.training)

    return run_stages(ctx, sparsities, lambda masks: magnitudes(ctx), after=rewind_and_retrain, label="round",
                      first=1)


def magnitudes(ctx: PruneContext) -> dict[str, Tensor]:
    return {t.name: t.dense.detach().abs() for t in ctx.targets}


def _rewind_point(ctx: PruneContext, hp: RetrainHparams) -> State | None:
    """The state survivors return to before each round (None for LR rewinding)."""
    if hp.train_dense:
        capture = _CaptureAt(int(hp.rewind_epoch * len(ctx.data))) if hp.rewind == "weights" else None
        train(ctx, hp.training, [capture] if capture else [])
        ctx.record(round=0, sparsity=0.0)
        return capture.state if capture else None
    if hp.rewind == "lr":
        return None
    if hp.rewind_weights is not None:
        return read_state_dict(hp.rewind_weights)[0]
    return snapshot(ctx.model)


class _CaptureAt(Callback):
    """Keeps the model's state as it is before optimizer step `step` (0: the initialisation)."""

    def __init__(self, step: int):
        self.step = step
        self.state: State | None = None

    def on_step_begin(self, trainer: Trainer, batch) -> None:
        if trainer.step == self.step:
            self.state = snapshot(trainer.model)


def snapshot(model: nn.Module) -> State:
    """A copy of every parameter and buffer under its plain name (masks folded in)."""
    return {name: tensor.detach().clone() for name, tensor in plain_state_dict(model).items()}
