"""Training inside a pruning method: prunekit's Trainer on the method's data, seeded by prune()'s seed.

Shared by every method that trains (IMP, OMP, SNIP/GraSP/SynFlow + training, BiP, Hydra, DPF, GMP,
one-shot + fine-tune), so that one seed fixes a whole run and "train under a mask" means one thing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

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
          params: Iterable[torch.Tensor] | None = None, *, segment: int = 0, first_epoch: int = 0) -> list[dict]:
    """Train ctx.model on ctx.data under `config`, seeded by prune()'s seed.

    A method that trains in several segments (a fresh optimizer and LR cycle each) numbers them:
    segment k is seeded with seed + k and sees the data from epoch `first_epoch` on, so segments
    do not replay each other's shuffles.
    """
    data = ctx.data if first_epoch == 0 else _FromEpoch(ctx.data, first_epoch)
    return Trainer(ctx.model, data, config, seed=ctx.seed + segment, loss=ctx.objective, callbacks=callbacks,
                   device=ctx.device, progress=False, params=params).fit()


def train_under_masks(ctx: PruneContext, masks: Mapping[str, torch.Tensor], config: TrainConfig,
                      callbacks: Iterable[Callback] = (), **segment: int) -> list[dict]:
    """Train with `masks` attached in masked mode: pruned weights are zero and get no gradient."""
    attach_masks(ctx.model, masks, MASKED)
    return train(ctx, config, callbacks, **segment)


class _FromEpoch:
    """The training data seen from a later epoch: each segment's Trainer counts epochs from 0."""

    def __init__(self, data, first_epoch: int) -> None:
        self.data, self.first_epoch = data, first_epoch

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.first_epoch + epoch)
