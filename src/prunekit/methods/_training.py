"""Training inside a pruning method: prunekit's Trainer on the method's data, seeded by prune()'s seed.

Shared by every method that trains (IMP, OMP, SNIP/GraSP/SynFlow + training, BiP, Hydra, DPF, GMP,
one-shot + fine-tune), so that one seed fixes a whole run and "train under a mask" means one thing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch

from ..errors import PrunekitError
from ..masks import MASKED, attach_masks
from ..training import Callback, TrainConfig, Trainer
from . import PruneContext


def require_training_data(ctx: PruneContext) -> None:
    """Training needs batches and their number per epoch (for the LR schedule); check before any work."""
    if ctx.data is None:
        raise PrunekitError("training the pruned network needs data: pass data=<loader of (inputs, targets)> "
                            "(from the CLI: --dataset), or set epochs=0 where the method allows it")
    try:
        len(ctx.data)
    except TypeError:
        raise PrunekitError("the training data needs len() (batches per epoch, for the LR schedule): pass a "
                            "prunekit.data.Loader or a list of batches") from None


def train(ctx: PruneContext, config: TrainConfig, callbacks: Iterable[Callback] = (),
          params: Iterable[torch.Tensor] | None = None) -> list[dict]:
    """Train ctx.model on ctx.data under `config`; prune()'s seed replaces the config's."""
    return Trainer(ctx.model, ctx.data, replace(config, seed=ctx.seed), callbacks=callbacks, device=ctx.device,
                   progress=False, params=params).fit()


def train_under_masks(ctx: PruneContext, masks: Mapping[str, torch.Tensor], config: TrainConfig,
                      callbacks: Iterable[Callback] = ()) -> list[dict]:
    """Train with `masks` attached in masked mode: pruned weights are zero and get no gradient."""
    attach_masks(ctx.model, masks, MASKED)
    return train(ctx, config, callbacks)


def masked_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Pruned entries / entries over all masks (weights, also for structured budgets)."""
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
