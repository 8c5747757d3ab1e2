"""DPF: dynamic pruning with feedback (Lin, Stich, Barba, Dmitriev & Jaggi, ICLR 2020).

DPF keeps the dense weights w and a mask m. Each step evaluates the stochastic gradient at the
pruned model and applies it to the dense one,

    w_{t+1} = w_t − γ_t · g(m_t ⊙ w_t),

with momentum and weight decay acting on w. Pruned weights therefore keep learning: writing
e_t = m_t ⊙ w_t − w_t, the step is w_t − γ_t · g(w_t + e_t), SGD with error feedback. Every p
steps m is recomputed from the magnitudes of the dense w, pruned coordinates included, so a
weight pruned too early comes back once it grows above the threshold. The sparsity follows the
cubic schedule of Zhu & Gupta (2017) from 0 at `start` to the target at `end`; then the mask is
frozen (`freeze`, the default). The result is m_T ⊙ w_T, without retraining.

What the reference code does (no official code was published; research notes §3): the PyTorch
reproduction (INCHEON) and a Keras callback both recompute a global magnitude mask (by w²)
every 16 steps on the cubic schedule, which ends at the second LR milestone (75% of training),
apply the gradient taken at the masked weights to the dense ones, and stop updating the mask
when the schedule ends. The PyTorch one prunes the convolutions only (the first one and the
1×1 shortcuts included) and leaves the final linear layer dense; the Keras one prunes every
kernel but the last layer's. prunekit does the same with these differences:
- it prunes every prunable tensor of the prune (convolutions and linear layers) unless told
  otherwise: the PyTorch reference's choice is `exclude="fc"` (the sparsity then counts the
  convolutions only, as the reference's target does) or a budget with `layer_sparsity={"fc": 0}`
  (the preset of the DPF suites' `conv-only` variants, whose reported sparsity includes the
  dense layer);
- each mask keeps exactly round(s · weights) (ties by position), where the references cut at a
  threshold;
- `freeze=False` keeps recomputing the mask at the target after the schedule, which no
  reference does (an ablation; earlier prunekit versions did it by default).

Budgets: global by default (the paper's "dynamic allocation"), layerwise with budget="uniform",
and the structured variant with structure="filters", where whole filters are ranked by their L2
norm under the same feedback rule.

Caution, measured (benchmarks/RESULTS.md): nothing pulls a pruned weight back, since its gradient
is taken with it at zero, so on a network without batch norm at high sparsity the gradients can
explode and the network die (LeNet-5 on CIFAR-10 at 0.98: max |w| ≤ 1.1 until step ~2100, then
26–34 in conv2 and fc2, 10% accuracy). Gradient clipping (`grad_clip`, the training setting,
off by default; 1 is what was measured) or a stronger weight decay (5e-4) prevents it; neither
is in the paper or the references. Each mask update records the pruning error
δ = ‖w − m⊙w‖²/‖w‖² in the history to show the drift; batch-normalised convolutions absorb it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hparams import group, setting
from ..masks import STRAIGHT_THROUGH
from ..training import BOOLEAN, TrainConfig
from . import PruneContext, register
from ._gradual import GradualHparams, check_gradual_budget, dense_square_magnitude, train_with_gradual_masks


@dataclass
class DPFHparams(GradualHparams):
    """Training settings (`grad_clip` among them), the schedule (p, start, end) and whether the mask freezes
    at the target."""

    training: TrainConfig = group(TrainConfig, help={
        "grad_clip": "clip the global gradient norm to this value (None: off, as in the paper and the references); "
                     "1 prevents the gradient explosion that kills DPF on LeNet-5 at 0.98 (benchmarks/RESULTS.md)"})
    freeze: bool = setting(True, "stop recomputing the mask once the schedule reaches the target, as both "
                           "reference implementations do; false keeps recomputing it at the target every p steps",
                           BOOLEAN)


@register("dpf", DPFHparams, "dynamic pruning with feedback: gradual magnitude masks, gradient at the pruned "
          "model applied to the dense weights (Lin et al. 2020)", needs_data=True, family="training",
          check=check_gradual_budget)
def dpf(ctx: PruneContext, hp: DPFHparams) -> dict[str, torch.Tensor]:
    # Straight-through: the forward pass uses m ⊙ w and the gradient taken there reaches every w; the
    # ranking includes the pruned (not monotone), so a pruned weight that grows comes back.
    return train_with_gradual_masks(ctx, hp, mode=STRAIGHT_THROUGH, score=dense_square_magnitude(ctx.targets),
                                    monotone=False, keep_updating=not hp.freeze)
