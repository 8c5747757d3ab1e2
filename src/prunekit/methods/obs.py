"""The OBS family on the empirical Fisher: WoodFisher and OBD (CHITA's baselines, methods.md §2.6).

Both model the loss near the current weights with the empirical Fisher F = (1/n)GᵀG (fisher.py).

- OBD (LeCun, Denker & Solla, "Optimal Brain Damage", NIPS 1990) with the diagonal of F: removing
  weight q costs ½ F_qq w_q². The cheapest are pruned; the other weights are NOT updated.
- WoodFisher (Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural
  Network Compression", NeurIPS 2020): Optimal Brain Surgeon (Hassibi & Stork 1993) with the inverse
  of a block-diagonal F + λI, built from λ⁻¹I by Woodbury updates. Removing q costs
  w_q² / (2[F⁻¹]_qq), and the surviving weights move by δw = −(w_q / [F⁻¹]_qq) F⁻¹e_q, the removed
  weights treated independently (their updates add up). The target is reached in `steps` steps of
  equal size, G and F⁻¹ recomputed at the current weights each time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fisher import (
    FisherHparams,
    WeightLayout,
    block_slices,
    diagonal_fisher,
    fisher_examples,
    gradient_call_bytes,
    gradient_matrix,
    matrix_bytes,
    require_memory,
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
                              "size; memory grows as weights × block size", integer(1))
    steps: int = setting(4, "recompute steps of equal sparsity increments; G and F⁻¹ are recomputed at each",
                         integer(1))


@dataclass
class ObdHparams(FisherHparams):
    """OBD: the Fisher's size, and stages (the diagonal recomputed at the pruned model before each)."""

    staging: StageSettings = group(StageSettings)


def block_inverse(rows: torch.Tensor, dampening: float) -> torch.Tensor:
    """(λI + (1/n) Σ gᵢgᵢᵀ)⁻¹ on one block's columns (float64); `rows` are the n gradients gᵢ.

    WoodFisher builds it from λ⁻¹I with one Woodbury (Sherman–Morrison) update per gradient. All n
    updates at once are λ⁻¹(I − Rᵀ(nλI + RRᵀ)⁻¹R), an n×n solve: the cheaper route when the block is
    wider than n. Otherwise factoring the b×b matrix itself gives the same inverse for less work.
    """
    rows = rows.to(torch.float64)
    n, size = rows.shape
    if size <= n:
        fisher = rows.T @ rows / n
        fisher.diagonal().add_(dampening)
        return torch.cholesky_inverse(torch.linalg.cholesky(fisher))
    inner = rows @ rows.T
    inner.diagonal().add_(n * dampening)
    inverse = -rows.T @ torch.cholesky_solve(rows, torch.linalg.cholesky(inner))
    inverse.diagonal().add_(1.0)
    return inverse / dampening


@register("woodfisher", WoodFisherHparams, "WoodFisher (Singh & Alistarh 2020): OBS with a block-diagonal "
          "empirical-Fisher inverse built by Woodbury updates; weights updated, several recompute steps",
          needs_data=True, check=lambda ctx, hp: _check_woodfisher_memory(hp, WeightLayout.of(ctx.targets)))
def woodfisher(ctx: PruneContext, hp: WoodFisherHparams) -> dict[str, torch.Tensor]:
    layout = WeightLayout.of(ctx.targets)
    blocks = block_slices(layout, hp.block_size)
    stages = Stages(ctx)
    for step, sparsity in enumerate(stage_sparsities(ctx.sparsity, hp.steps, "linear", ctx.sparsity / hp.steps)):
        kept = layout.flatten(stages.masks)
        g = _fisher_rows(ctx, hp)
        g.rows[:, ~kept] = 0  # removed weights leave the model: F⁻¹ is then the inverse over the kept ones
        w = layout.flatten({t.name: t.weight for t in ctx.targets}).to(torch.float64)
        inverses = [block_inverse(g.rows[:, columns], hp.dampening) for columns in blocks]
        inverse_diagonal = torch.cat([inverse.diagonal() for inverse in inverses])
        masks = stages.select(layout.unflatten(w.square() / (2 * inverse_diagonal)), sparsity)  # OBS saliency
        now_kept = layout.flatten(masks)
        removed = kept & ~now_kept
        for columns, inverse in zip(blocks, inverses):
            # δw = −F⁻¹ Σ_q (w_q / [F⁻¹]_qq) e_q over the block's removed weights
            weights_out = torch.where(removed[columns], w[columns] / inverse_diagonal[columns], 0.0)
            w[columns] -= inverse @ weights_out
        layout.write(ctx.targets, w * now_kept)
        stages.record(step=step, scheduled=sparsity, gradients=g.route)
    return stages.masks


def _check_obd_memory(ctx: PruneContext, hp: ObdHparams) -> None:
    require_memory("obd", {"gradient calls": gradient_call_bytes(hp, WeightLayout.of(ctx.targets).p)}, hp,
                   "--fisher-chunk")


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


def _fisher_rows(ctx: PruneContext, hp: FisherHparams):
    """G at the current weights on the next n examples of the data."""
    examples = to_device(fisher_examples(ctx.data, hp.fisher_samples * hp.fisher_batch), ctx.device)
    return gradient_matrix(ctx.model, ctx.targets, examples, ctx.objective, batch=hp.fisher_batch,
                           chunk=hp.fisher_chunk, meter=ctx.meter)


def _check_woodfisher_memory(hp: WoodFisherHparams, layout: WeightLayout) -> None:
    blocks = block_slices(layout, hp.block_size)
    n = hp.fisher_samples
    widest = max(b.stop - b.start for b in blocks)
    parts = {"G": matrix_bytes(n, layout.p), "gradient calls": gradient_call_bytes(hp, layout.p),
             "block inverses": sum(matrix_bytes(b.stop - b.start, b.stop - b.start, torch.float64) for b in blocks),
             "one block's update": matrix_bytes(n, widest, torch.float64) * 2 + matrix_bytes(n, n, torch.float64)}
    require_memory(f"woodfisher (n={n}, block size {hp.block_size})", parts, hp,
                   f"--block-size ({hp.block_size}) or --fisher-samples (n={n})")
