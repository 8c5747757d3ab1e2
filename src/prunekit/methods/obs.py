"""The OBS family on the empirical Fisher: WoodFisher and OBD (CHITA's baselines, methods.md §2.6).

Both model the loss near the current weights with the empirical Fisher F = (1/n)GᵀG (fisher.py).

- OBD (LeCun, Denker & Solla, "Optimal Brain Damage", NIPS 1990) with the diagonal of F: removing
  weight q costs ½ F_qq w_q². The cheapest are pruned; the other weights are NOT updated.
- WoodFisher (Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural
  Network Compression", NeurIPS 2020): Optimal Brain Surgeon (Hassibi & Stork 1993) with the inverse
  of a block-diagonal F + λI, built from λ⁻¹I by Woodbury updates (streamed: G a group of tensors at a
  time, the block inverses a chunk at a time, so memory does not grow with the block size). Removing q costs
  w_q² / (2[F⁻¹]_qq), and the surviving weights move by δw = −(w_q / [F⁻¹]_qq) F⁻¹e_q, the removed
  weights treated independently (their updates add up). The target is reached in `steps` steps of
  equal size, G and F⁻¹ recomputed at the current weights each time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..fisher import (
    BLOCK_CHUNK_BYTES,
    FisherHparams,
    GroupedGradients,
    WeightLayout,
    block_chunks,
    blocked,
    blocked_rows,
    diagonal_fisher,
    fisher_examples,
    call_activation_bytes,
    gradient_call_bytes,
    matrix_bytes,
    require_memory,
    require_streamed_memory,
    streamed_groups,
)
from ..hparams import group, integer, number, setting
from ..schedules import stage_sparsities
from ..objectives import to_device
from . import PruneContext, register
from ._stages import Criterion, StageSettings, Stages, run_stages


@dataclass
class WoodFisherHparams(FisherHparams):
    """WoodFisher: the Fisher's blocks, its dampening, and how many recompute steps reach the target."""

    dampening: float = setting(1e-5, "λ added to the Fisher's diagonal (> 0)", number(0, low_open=True))
    block_size: int = setting(1000, "tensors of at least this many weights are cut into blocks of about this "
                              "size; time grows as weights × block size² (blocks are streamed: memory does not)",
                              integer(1))
    steps: int = setting(4, "recompute steps of equal sparsity increments; G and F⁻¹ are recomputed at each",
                         integer(1))


@dataclass
class ObdHparams(FisherHparams):
    """OBD: the Fisher's size, and stages (the diagonal recomputed at the pruned model before each)."""

    staging: StageSettings = group(StageSettings)


def block_inverses(rows: torch.Tensor, dampening: float) -> torch.Tensor:
    """(λI + (1/n) Σ gᵢgᵢᵀ)⁻¹ of each block (float64): `rows` (blocks, n, b) are each block's n gradients gᵢ.

    WoodFisher builds it from λ⁻¹I with one Woodbury (Sherman–Morrison) update per gradient. All n
    updates at once are λ⁻¹(I − Rᵀ(nλI + RRᵀ)⁻¹R), an n×n solve: the cheaper route when the block is
    wider than n. Otherwise factoring the b×b matrix itself gives the same inverse for less work.
    """
    rows = rows.to(torch.float64)
    n, size = rows.shape[-2:]
    if size <= n:
        fisher = rows.transpose(-1, -2) @ rows / n
        fisher.diagonal(dim1=-2, dim2=-1).add_(dampening)
        return torch.cholesky_inverse(torch.linalg.cholesky(fisher))
    inner = rows @ rows.transpose(-1, -2)
    inner.diagonal(dim1=-2, dim2=-1).add_(n * dampening)
    inverse = -rows.transpose(-1, -2) @ torch.cholesky_solve(rows, torch.linalg.cholesky(inner))
    inverse.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return inverse / dampening


def _woodfisher_fixed_parts(hp: WoodFisherHparams, ctx: PruneContext) -> dict[str, int]:
    """What WoodFisher holds besides a group's G: a chunk of block inverses with their factorisation's copies, the
    weights, inverse diagonal and masks, and the gradient calls' activations."""
    return {"block chunk": 4 * BLOCK_CHUNK_BYTES, "vectors": matrix_bytes(4, WeightLayout.of(ctx.targets).p,
                                                                          torch.float64),
            "gradient calls' activations": call_activation_bytes(hp.fisher_chunk, ctx.example_activations)}


def _check_woodfisher_memory(ctx: PruneContext, hp: WoodFisherHparams) -> None:
    ctx.meter.cost.planned_memory_bytes = require_streamed_memory(
        f"woodfisher (n={hp.fisher_samples}, block size {hp.block_size})", ctx.targets, hp,
        _woodfisher_fixed_parts(hp, ctx), f"--fisher-samples (n={hp.fisher_samples})")


@register("woodfisher", WoodFisherHparams, "WoodFisher (Singh & Alistarh 2020): OBS with a block-diagonal "
          "empirical-Fisher inverse built by Woodbury updates; weights updated, several recompute steps",
          needs_data=True, check=_check_woodfisher_memory)
def woodfisher(ctx: PruneContext, hp: WoodFisherHparams) -> dict[str, torch.Tensor]:
    layout = WeightLayout.of(ctx.targets)
    groups = streamed_groups(ctx.targets, hp, _woodfisher_fixed_parts(hp, ctx))
    stages = Stages(ctx)
    for step, sparsity in enumerate(stage_sparsities(ctx.sparsity, hp.steps, "linear", ctx.sparsity / hp.steps)):
        kept = layout.flatten(stages.masks)
        examples = to_device(fisher_examples(ctx.data, hp.fisher_samples * hp.fisher_batch), ctx.device)
        gradients = GroupedGradients(ctx.model, ctx.targets, examples, ctx.objective, groups, batch=hp.fisher_batch,
                                     chunk=hp.fisher_chunk, meter=ctx.meter)
        w = layout.flatten({t.name: t.weight for t in ctx.targets}).to(torch.float64)
        inverse_diagonal = torch.empty_like(w)
        for columns, inverses, present in _streamed_inverses(gradients, kept, hp):
            inverse_diagonal[columns] = inverses.diagonal(dim1=1, dim2=2)[present]
        masks = stages.select(layout.unflatten(w.square() / (2 * inverse_diagonal)), sparsity)  # OBS saliency
        now_kept = layout.flatten(masks)
        removed = kept & ~now_kept
        # A second pass (G kept when it is one group): δw = −F⁻¹ Σ_q (w_q / [F⁻¹]_qq) e_q over each block's removed
        # weights, which needs the whole selection, so every block's inverse again.
        for columns, inverses, present in _streamed_inverses(gradients, kept, hp):
            weights_out = torch.where(removed[columns], w[columns] / inverse_diagonal[columns], 0.0)
            w[columns] -= (inverses @ blocked(weights_out, present.shape[1]).unsqueeze(2)).squeeze(2)[present]
        layout.write(ctx.targets, w * now_kept)
        stages.record(step=step, scheduled=sparsity, gradients=gradients.route)
    return stages.masks


def _streamed_inverses(gradients: GroupedGradients, kept: torch.Tensor,
                       hp: WoodFisherHparams) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(columns, their blocks' inverses, which block entries are weights) of every chunk of blocks. Removed weights
    leave the model: their columns of G are zero, so F⁻¹ is the inverse over the kept ones."""
    for offset, g in gradients:
        for tensor in g.layout.slices():
            for local, width in block_chunks(tensor, hp.block_size, g.n, BLOCK_CHUNK_BYTES):
                columns = slice(offset + local.start, offset + local.stop)
                rows = g.rows[:, local] * kept[columns]
                present = blocked(torch.ones(rows.shape[1], device=rows.device), width).bool()
                yield columns, block_inverses(blocked_rows(rows, width), hp.dampening), present


def _check_obd_memory(ctx: PruneContext, hp: ObdHparams) -> None:
    ctx.meter.cost.planned_memory_bytes = require_memory(
        "obd", {"gradient calls": gradient_call_bytes(hp, WeightLayout.of(ctx.targets).p, None,
                                                      ctx.example_activations)}, hp, "--fisher-chunk")


@register("obd", ObdHparams, "OBD (LeCun et al. 1990) with the diagonal empirical Fisher: remove the smallest "
          "½·F_qq·w_q²; the other weights are not updated", needs_data=True, check=_check_obd_memory)
def obd(ctx: PruneContext, hp: ObdHparams) -> dict[str, torch.Tensor]:
    return run_stages(ctx, hp.staging.sparsities(ctx.sparsity), obd_criterion(ctx, hp))


def obd_criterion(ctx: PruneContext, hp: FisherHparams) -> Criterion:
    """½ F_qq w_q² with the diagonal empirical Fisher at the network each call finds (the data's next n examples)."""
    layout = WeightLayout.of(ctx.targets)
    count = hp.fisher_samples * hp.fisher_batch
    drawn = [fisher_examples(ctx.data, count)]  # drawn now, so that too little data fails before any work

    def saliency(masks) -> dict[str, torch.Tensor]:
        examples = to_device(drawn.pop() if drawn else fisher_examples(ctx.data, count), ctx.device)
        fisher = diagonal_fisher(ctx.model, ctx.targets, examples, ctx.objective, batch=hp.fisher_batch,
                                 chunk=hp.fisher_chunk, meter=ctx.meter)
        w = layout.flatten({t.name: t.weight for t in ctx.targets}).to(torch.float64)
        return layout.unflatten(0.5 * fisher * w.square())

    return saliency
