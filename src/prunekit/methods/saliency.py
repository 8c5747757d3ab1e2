"""Pruning at initialisation, then training the sparse network: SNIP, GraSP and SynFlow.

SNIP: Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.
    S = |θ ⊙ ∇_θ L| on a mini-batch; keep the highest.
GraSP: Wang et al., "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020.
    S = −θ ⊙ H g with g = ∇_θ L and H g a Hessian-vector product; remove the HIGHEST S (to first
    order, removing weight q changes the gradient norm gᵀg by −2 θ_q (Hg)_q = 2 S_q, so the
    highest S are the weights whose removal preserves, or even raises, the gradient flow). The
    logits are divided by a temperature T (200 in the authors' code).
SynFlow: Tanaka et al., "Pruning neural networks without any data by iteratively conserving
    synaptic flow", NeurIPS 2020. R = 1ᵀ f_|θ|(1): an all-ones input through the network with every
    parameter and buffer made positive and BN in eval mode; S = |θ ⊙ ∂R/∂θ|; n = 100 rounds of
    rescoring and pruning to 1 − (1 − s)^(k/n), k = 1 … n. The scores use no data. R is a product
    over the layers, which overflows float32 on deep networks (ResNet-56 at initialisation), so the
    flow runs on a float64 copy of the state through `torch.func.functional_call`: the model's own
    weights are never changed, and there are no signs to restore.

Each then trains the sparse network for `epochs` with the Trainer, pruned weights held at zero
(default 0: only the masks; set epochs to train as the papers do). SNIP and GraSP score in training
mode, as training would see the network (BN normalises with batch statistics, and its running
statistics see those batches).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import PrunekitError
from ..hparams import group, integer, number, setting
from ..modes import model_mode
from ..objectives import Batch, CrossEntropy, Objective, to_device, without_labels
from ..targets import Target
from ..training import TrainConfig
from . import PruneContext, register
from ._stages import Criterion, StageSettings, run_stages
from ._training import require_training_data, train_under_masks



@dataclass
class PruneThenTrainHparams:
    """Training of the sparse network after pruning; seeded by prune()'s seed."""

    training: TrainConfig = group(TrainConfig, help={
        "epochs": "epochs of training of the sparse network after pruning, as the papers do (0: prune only)"},
        checks={"epochs": integer(0)}, epochs=0)


@dataclass
class SnipHparams(PruneThenTrainHparams):
    """SNIP: connection sensitivity on `batches` mini-batches (the paper uses one), in one or more stages."""

    batches: int = setting(1, "mini-batches of the data the scores are computed on", integer(1))
    staging: StageSettings = group(StageSettings)


@dataclass
class GraspHparams(SnipHparams):
    """GraSP: gradient-flow preservation on `batches` mini-batches, logits divided by `temperature`."""

    temperature: float = setting(200.0, "the logits are divided by this before the loss (200 in the GraSP "
                                 "authors' code; 1: plain loss)", number(0, low_open=True))


@dataclass
class SynflowHparams(PruneThenTrainHparams):
    """SynFlow: `iterations` rounds of rescoring on the exponential schedule. Data only trains the result."""

    iterations: int = setting(100, "pruning rounds, each rescoring the survivors; round k prunes to "
                              "1 - (1 - sparsity)^(k/iterations)", integer(1))


def _check_can_train(ctx: PruneContext, hp: PruneThenTrainHparams) -> None:
    if hp.training.epochs > 0:
        require_training_data(ctx)


@register("snip", SnipHparams, "SNIP at initialisation: keep the largest |w * grad| on a mini-batch, then train",
          needs_data=True, family="at-init", check=_check_can_train)
def snip(ctx: PruneContext, hp: SnipHparams) -> dict[str, Tensor]:
    return _then_train(ctx, run_stages(ctx, hp.staging.sparsities(ctx.sparsity), snip_criterion(ctx, hp)), hp)


@register("grasp", GraspHparams, "GraSP at initialisation: remove the largest -w * Hg (gradient flow kept), "
          "then train", needs_data=True, family="at-init", check=_check_can_train)
def grasp(ctx: PruneContext, hp: GraspHparams) -> dict[str, Tensor]:
    return _then_train(ctx, run_stages(ctx, hp.staging.sparsities(ctx.sparsity), grasp_criterion(ctx, hp)), hp)


@register("synflow", SynflowHparams, "SynFlow at initialisation, data-free: iteratively keep the largest "
          "|w * dR/dw| of the all-ones flow, then train (data only for training)", family="at-init",
          check=_check_can_train)
def synflow(ctx: PruneContext, hp: SynflowHparams) -> dict[str, Tensor]:
    schedule = StageSettings(hp.iterations, "geometric").sparsities(ctx.sparsity)
    return _then_train(ctx, run_stages(ctx, schedule, synflow_criterion(ctx)), hp)


# ---------------------------------------------------------------- criteria: scores at the network as it is

def snip_criterion(ctx: PruneContext, hp: SnipHparams) -> Criterion:
    """|θ ⊙ ∇_θ L| on the data's first `batches` mini-batches, at the network each call finds."""
    batches = _first_batches(ctx, hp.batches)
    return lambda masks: snip_scores(ctx.model, ctx.targets, batches, ctx.objective)


def grasp_criterion(ctx: PruneContext, hp: GraspHparams) -> Criterion:
    """GraSP prunes the highest S: the ranking is the distance below the highest (non-negative, as stages need)."""
    batches = _first_batches(ctx, hp.batches)

    def score(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = grasp_scores(ctx.model, ctx.targets, batches, ctx.objective, hp.temperature)
        highest = max(float(score.max()) for score in scores.values())
        return {name: highest - score for name, score in scores.items()}

    return score


def synflow_criterion(ctx: PruneContext) -> Criterion:
    """|θ ⊙ ∂R/∂θ| of the all-ones flow through the network with the current masks' zeros."""
    input_shape = _input_shape(ctx)
    return lambda masks: synflow_scores(ctx.model, ctx.targets, input_shape, masks)


# ---------------------------------------------------------------- scores

def snip_scores(model: nn.Module, targets: Sequence[Target], batches: Sequence[Batch],
                objective: Objective | None = None) -> dict[str, Tensor]:
    """S = |θ ⊙ ∇_θ L|, L the objective's mean loss over `batches` (cross-entropy by default)."""
    weights = [t.dense for t in targets]
    with model_mode(model, training=True):
        grads = _mean_gradient(model, weights, batches, objective or CrossEntropy())
    return {t.name: (w.detach() * g).abs() for t, w, g in zip(targets, weights, grads)}


def grasp_scores(model: nn.Module, targets: Sequence[Target], batches: Sequence[Batch],
                 objective: Objective | None = None, temperature: float = 200.0) -> dict[str, Tensor]:
    """S = −θ ⊙ H g with g = ∇_θ L (fixed) and H g = ∇_θ(gᵀ ∇_θ L); GraSP removes the highest S.

    Under cross-entropy the logits are divided by `temperature` (the authors' T); other objectives as they are.
    """
    objective = objective or CrossEntropy()
    if isinstance(objective, CrossEntropy):
        objective = replace(objective, temperature=temperature)
    weights = [t.dense for t in targets]
    # H g differentiates twice: CPU attention's fused kernels have no second derivative, the math one has.
    with model_mode(model, training=True), sdpa_kernel(SDPBackend.MATH):
        g = _mean_gradient(model, weights, batches, objective)
        hessian_g = [torch.zeros_like(w) for w in weights]
        for batch in batches:
            grad = torch.autograd.grad(objective.loss(model, batch)[0], weights, create_graph=True)
            g_dot_grad = sum((gi * gr).sum() for gi, gr in zip(g, grad))
            for total, part in zip(hessian_g, torch.autograd.grad(g_dot_grad, weights)):
                total += part
    return {t.name: -(w.detach() * hg / len(batches)) for t, w, hg in zip(targets, weights, hessian_g)}


def synflow_scores(model: nn.Module, targets: Sequence[Target], input_shape: Sequence[int],
                   masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """S = |θ ⊙ ∂R/∂θ| with R = 1ᵀ f_|θ|(1), the summed output for an all-ones input when every parameter
    and buffer is |·| (in float64), BN is in eval mode and the weights `masks` prune are zero."""
    state = _linearised_state(model)
    key = {id(parameter): name for name, parameter in model.named_parameters()}
    weights = []
    for target in targets:
        name = key[id(target.dense)]
        kept = 1.0 if masks is None else masks[target.name]
        state[name] = (state[name] * kept).requires_grad_()
        weights.append(state[name])
    ones = torch.ones(1, *input_shape, dtype=torch.float64, device=weights[0].device)
    with model_mode(model, training=False):
        flow = functional_call(model, state, (ones,)).sum()
    grads = torch.autograd.grad(flow, weights)
    return {t.name: (w.detach() * g).abs() for t, w, g in zip(targets, weights, grads)}


def _mean_gradient(model: nn.Module, weights: list[Tensor], batches: Sequence[Batch],
                   objective: Objective) -> list[Tensor]:
    totals = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for total, grad in zip(totals, torch.autograd.grad(objective.loss(model, batch)[0], weights)):
            total += grad
    return [total / len(batches) for total in totals]


def _linearised_state(model: nn.Module) -> dict[str, Tensor]:
    """|θ| in float64 for every floating parameter and buffer, detached from the model; others as they are."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return {name: tensor.detach().abs().double() if tensor.is_floating_point() else tensor for name, tensor in named}


# ---------------------------------------------------------------- helpers

def _first_batches(ctx: PruneContext, count: int) -> list[Batch]:
    batches = [to_device(batch, ctx.device) for batch in itertools.islice(ctx.data, count)]
    if len(batches) < count:
        raise PrunekitError(f"the scores need {count} batches but the data gave {len(batches)}; "
                            "lower batches or pass more data")
    return batches


def _input_shape(ctx: PruneContext) -> tuple[int, ...]:
    """The shape of one input: the model's `input_shape` (zoo models have it), else the data's (shape only)."""
    shape = getattr(ctx.model, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    if ctx.data is not None:
        for batch in ctx.data:
            inputs = without_labels(batch)
            if isinstance(inputs, Tensor):
                return tuple(inputs.shape[1:])
            break
    raise PrunekitError("synflow feeds an all-ones input and needs its shape: give the model an input_shape "
                        "attribute, e.g. (1, 28, 28), or pass data (only its shape is used)")


def _then_train(ctx: PruneContext, masks: dict[str, Tensor], hp: PruneThenTrainHparams) -> dict[str, Tensor]:
    if hp.training.epochs > 0:
        train_under_masks(ctx, masks, hp.training)
    return masks
