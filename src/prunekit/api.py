"""`prunekit.prune`: the one public entry that every method goes through."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import hparams as hparams_lib
from .budgets import Budget, check_sparsity
from .cost import Cost, CostMeter
from .errors import PrunekitError
from .masks import attach_masks
from .methods import PRUNE_OWNED_FIELDS, PruneContext, get_method
from .tables import render_table
from .targets import Skipped, Target, find_targets

DEFAULT_SPARSITY = 0.9


@dataclass(frozen=True)
class LayerResult:
    name: str
    shape: tuple[int, ...]
    numel: int
    requested: float | None  # None where a global ranking decided the layer's share
    achieved: float


@dataclass
class PruneResult:
    """What `prune` did: masks, sparsity per layer (requested vs achieved) and its cost."""

    method: str
    hparams: dict[str, Any]
    requested_sparsity: float
    masks: dict[str, torch.Tensor]
    layers: list[LayerResult]
    skipped: list[Skipped]
    cost: Cost
    budget: Budget = field(default_factory=Budget)
    history: list[dict[str, Any]] = field(default_factory=list)  # the method's progress, cost so far at each point

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned tensors (zeros / total)."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.achieved * layer.numel for layer in self.layers) / total

    def metadata(self) -> dict[str, Any]:
        """What a mask file records about how it was made."""
        return {"method": self.method, "hparams": self.hparams, "budget": hparams_lib.to_dict(self.budget),
                "requested_sparsity": self.requested_sparsity, "cost": self.cost.to_dict()}

    def __str__(self) -> str:
        rows = [[l.name, "×".join(map(str, l.shape)), l.numel,
                 "global" if l.requested is None else f"{l.requested:.4f}", f"{l.achieved:.4f}"] for l in self.layers]
        rows.append(["total", "", sum(l.numel for l in self.layers), f"{self.requested_sparsity:.4f}",
                     f"{self.sparsity:.4f}"])
        lines = [f"{self.method}: sparsity {self.sparsity:.4f} (requested {self.requested_sparsity:.4f})",
                 render_table(["tensor", "shape", "weights", "requested", "achieved"], rows),
                 f"cost: {self.cost}"]
        if self.skipped:
            lines.append("not pruned: " + "; ".join(f"{s.name} ({s.reason})" for s in self.skipped))
        return "\n".join(lines)


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = None,
    data: Any = None,
    *,
    budget: str | Budget = "global",
    structure: str = "unstructured",
    n: int = 2,
    m: int = 4,
    layer_sparsity: Mapping[str, float] | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    seed: int = 0,
    observer: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    **method_hparams: Any,
) -> PruneResult:
    """Prune `model` in place (masks attached) and say what was done and what it cost.

    `sparsity` is the fraction of zeros over the prunable tensors (default 0.9; N:M implies 1 - N/M).
    `data` is an iterable of (inputs, targets) batches for methods that need data. `budget` is an
    allocation name ("global", "uniform", "erk") or a Budget; `structure`, `n`, `m` and
    `layer_sparsity` complete it. `include`/`exclude` are regexes on tensor names. `observer(model, event)`
    is called at each point the method records (stages, rounds), with the model as it is then.
    Every argument is checked before any work is done.
    """
    spec = get_method(method)
    _reject_prune_owned(method_hparams)
    hp = hparams_lib.build(spec.hparams, method_hparams, f"method {method!r}")
    budget = budget if isinstance(budget, Budget) else Budget(budget, structure, n, m, layer_sparsity)
    sparsity = _resolve_sparsity(sparsity, budget)
    targets, skipped = _prunable(model, budget, include, exclude)
    if spec.needs_data and data is None:
        raise PrunekitError(f"method {method!r} needs data: pass data=<iterable of (inputs, targets) batches> "
                            "(from the CLI: --dataset and --data-dir)")
    device = targets[0].dense.device
    with CostMeter(model, device) as meter:
        ctx = PruneContext(model, targets, sparsity, budget, data, seed, meter, device, observer=observer)
        masks = spec.run(ctx, hp)
        attach_masks(model, masks, spec.mask_mode)
    return PruneResult(method, hparams_lib.to_dict(hp), sparsity, masks,
                       _layer_results(targets, masks, budget, sparsity), skipped, meter.cost, budget, ctx.history)


def _reject_prune_owned(method_hparams: Mapping[str, Any]) -> None:
    for name in PRUNE_OWNED_FIELDS:
        if name in method_hparams:
            raise PrunekitError(f"{name} is not a method hyperparameter: training methods are seeded by prune()'s "
                                "`seed` and take the batch size of the data you pass (the loader's batch size)")


def _resolve_sparsity(sparsity: float | None, budget: Budget) -> float:
    fixed = budget.fixed_sparsity
    if fixed is None:
        return check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
    if sparsity is not None and abs(sparsity - fixed) > 1e-9:
        raise PrunekitError(f"{budget.n}:{budget.m} sparsity is always {fixed:g}; drop --sparsity or set it to {fixed:g}")
    return fixed


def _prunable(model: nn.Module, budget: Budget, include, exclude) -> tuple[list[Target], list[Skipped]]:
    targets, skipped = find_targets(model, include, exclude)
    kept = []
    for target in targets:
        reason = budget.skip_reason(target)
        if reason is None:
            kept.append(target)
        else:
            skipped.append(Skipped(target.name, target.numel, f"{budget.structure}: {reason}"))
    if not kept:
        raise PrunekitError(f"no tensor of this model can take {budget.structure} sparsity: "
                            + "; ".join(s.reason for s in skipped[-3:]))
    for target in kept:
        if not torch.isfinite(target.weight).all():
            raise PrunekitError(f"weight {target.name} contains NaN or infinity; the model is broken "
                                "(check the checkpoint or the training that produced it)")
    return kept, skipped


def _layer_results(targets: list[Target], masks: Mapping[str, torch.Tensor], budget: Budget,
                   sparsity: float) -> list[LayerResult]:
    requested = budget.requested({t.name: t.shape for t in targets}, sparsity)
    return [LayerResult(t.name, tuple(t.shape), t.numel, requested[t.name],
                        1 - int(masks[t.name].sum()) / t.numel) for t in targets]
