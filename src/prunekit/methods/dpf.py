"""DPF: dynamic pruning with feedback (Lin, Stich, Barba, Dmitriev & Jaggi, ICLR 2020).

DPF keeps the dense weights w and a mask m. Each step evaluates the stochastic gradient at the
pruned model and applies it to the dense one,

    w_{t+1} = w_t − γ_t · g(m_t ⊙ w_t),

with momentum and weight decay acting on w. Pruned weights therefore keep learning: writing
e_t = m_t ⊙ w_t − w_t, the step is w_t − γ_t · g(w_t + e_t), SGD with error feedback. Every p
steps m is recomputed from the magnitudes of the dense w, pruned coordinates included, so a
weight pruned too early comes back once it grows above the threshold. The sparsity follows the
cubic schedule of Zhu & Gupta (2017) from 0 at `start` to the target at `end` and, unless
`freeze`, the mask keeps being recomputed at the target afterwards. The result is m_T ⊙ w_T,
without retraining.

Budgets: global by default (the paper's "dynamic allocation"), layerwise with budget="uniform",
and the structured variant with structure="filters", where whole filters are ranked by their L2
norm under the same feedback rule.

Caution, measured (benchmarks/RESULTS.md): nothing pulls a pruned weight back, since its gradient
is taken with it at zero, so on a network without batch norm at high sparsity the pruned dense
weights can drift far and, once reactivated, blow the network up (LeNet-5 on CIFAR-10 at 0.98
ended at chance after 10 epochs). Each mask update records the pruning error
δ = ‖w − m⊙w‖²/‖w‖² in the history to show it; batch-normalised convolutions absorb the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hparams import setting
from ..masks import STRAIGHT_THROUGH
from . import PruneContext, register
from ._gradual import GradualHparams, check_gradual_budget, dense_square_magnitude, train_with_gradual_masks


@dataclass
class DPFHparams(GradualHparams):
    """Training settings, the schedule (p, start, end) and whether the mask freezes at the target."""

    freeze: bool = setting(False, "stop recomputing the mask once the schedule reaches the target (default: "
                           "keep recomputing)")


@register("dpf", DPFHparams, "dynamic pruning with feedback: gradual magnitude masks, gradient at the pruned "
          "model applied to the dense weights (Lin et al. 2020)", needs_data=True, family="training",
          check=check_gradual_budget)
def dpf(ctx: PruneContext, hp: DPFHparams) -> dict[str, torch.Tensor]:
    # Straight-through: the forward pass uses m ⊙ w and the gradient taken there reaches every w; the
    # ranking includes the pruned (not monotone), so a pruned weight that grows comes back.
    return train_with_gradual_masks(ctx, hp, mode=STRAIGHT_THROUGH, score=dense_square_magnitude(ctx.targets),
                                    monotone=False, keep_updating=not hp.freeze)
