"""`prunekit.prune`: the one public entry that every method goes through."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import hparams as hparams_lib
from .budgets import Budget, Plan, check_sparsity
from .channels import ChannelGroups, channel_groups
from .cost import Cost, CostMeter
from .errors import PrunekitError
from .fisher import FisherHparams, saved_activation_bytes
from .masks import attach_masks, mask_sparsity
from .methods import PruneContext, get_method
from .modes import model_mode
from .objectives import Loss, Objective, as_objective, infer_objective, probe, to_device, without_labels
from .tables import render_table
from .targets import Skipped, Target, describe_skipped, find_targets

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
    # What the method minimised (None without data); evaluate with it, e.g. distill's cosine to the dense model.
    objective: Objective | None = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned tensors (pruned / total)."""
        return mask_sparsity(self.masks)

    def metadata(self) -> dict[str, Any]:
        """What a mask file records about how it was made."""
        return {"method": self.method, "hparams": self.hparams, "budget": hparams_lib.to_dict(self.budget),
                "requested_sparsity": self.requested_sparsity, "cost": self.cost.to_dict()}

    def __str__(self) -> str:
        # Under `groups` the request counts coupled channel groups; the weights' sparsity follows from them.
        groups = self.budget.structure == "groups"
        decided = "groups" if groups else "global"
        rows = [[l.name, "×".join(map(str, l.shape)), l.numel,
                 decided if l.requested is None else f"{l.requested:.4f}", f"{l.achieved:.4f}"] for l in self.layers]
        rows.append(["total", "", sum(l.numel for l in self.layers), f"{self.requested_sparsity:.4f}",
                     f"{self.sparsity:.4f}"])
        of_groups = " of the coupled channel groups" if groups else ""
        lines = [f"{self.method}: sparsity {self.sparsity:.4f} (requested {self.requested_sparsity:.4f}{of_groups})",
                 render_table(["tensor", "shape", "weights", "requested", "achieved"], rows),
                 f"cost: {self.cost}"]
        if self.skipped:
            lines.append(describe_skipped(self.skipped))
        return "\n".join(lines)


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = None,
    data: Any = None,
    *,
    budget: str | Budget = "global",
    structure: str | None = None,
    n: int | None = None,
    m: int | None = None,
    layer_sparsity: Mapping[str, float] | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    seed: int = 0,
    loss: Loss = None,
    observer: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    **method_hparams: Any,
) -> PruneResult:
    """Prune `model` in place (masks attached) and say what was done and what it cost.

    `sparsity` is the fraction of zeros over the prunable tensors (default 0.9; N:M implies 1 - N/M).
    `data` is a re-iterable of batches for methods that need data: `(inputs, targets)` tuples, or
    mappings passed as `model(**batch)` (Hugging Face style). `loss` is what data-driven methods,
    their training and their scores minimise: None (inferred from the first batch: a mapping with
    labels → the model's own loss, integer targets → cross-entropy), a name ("cross-entropy",
    "causal-lm", "model", "distill": match the dense model's outputs, no labels needed), an
    `Objective`, or a callable `loss(model, batch) -> scalar tensor`. `budget` is an
    allocation name ("global", "uniform", "erk") or a Budget; `structure` (default "unstructured"),
    `n`, `m` (default 2:4) and `layer_sparsity` complete a name (a Budget already holds them).
    `include`/`exclude` are regexes on tensor names. `observer(model, event)` is called at each
    point the method records (stages, rounds), with the model as it is then.
    Every argument is checked before any work is done.
    """
    spec = get_method(method)
    hp = hparams_lib.build(spec.hparams, method_hparams, f"method {method!r}")
    budget = _budget(budget, structure=structure, n=n, m=m, layer_sparsity=layer_sparsity)
    sparsity = _resolve_sparsity(sparsity, budget)
    targets, skipped = _prunable(model, budget, include, exclude)
    if spec.needs_data and data is None:
        raise PrunekitError(f"method {method!r} needs data: pass data=<iterable of (inputs, targets) batches> "
                            "(from the CLI: --dataset and --data-dir)")
    device = targets[0].dense.device
    plan = budget.plan({t.name: t.shape for t in targets}, sparsity, {t.name: t.layout for t in targets},
                       _coupling(model, budget, targets, data, device))
    meter = CostMeter(model, device)
    ctx = PruneContext(model, targets, sparsity, budget, data, seed, meter, device, observer=observer, plan=plan)
    if spec.check is not None:
        spec.check(ctx, hp)  # before the data is read: bad settings fail first
    ctx.objective, first = _objective(loss, model, data, device)  # reads the first batch, before work
    if first is not None and spec.check is not None and issubclass(spec.hparams, FisherHparams):
        # The memory planner's per-example term, which the first batch shows; checked again with it.
        ctx.example_activations = saved_activation_bytes(model, targets, ctx.objective, first)
        spec.check(ctx, hp)
    with meter:
        masks = spec.run(ctx, hp)
        attach_masks(model, masks, spec.mask_mode)
    return PruneResult(method, hparams_lib.to_dict(hp), sparsity, masks, _layer_results(targets, masks, plan),
                       skipped, meter.cost, budget, ctx.history, ctx.objective)


def _objective(loss: Loss, model: nn.Module, data: Any, device: torch.device) -> tuple[Objective | None, Any]:
    """The loss made concrete (inferred from the first batch when None) and tried once on that batch, so a
    batch the model cannot take or a loss that is not a finite scalar fails here, before any work; and the
    first batch (None without data)."""
    if data is None:
        return None if loss is None else as_objective(loss, model), None
    try:
        first = to_device(next(iter(data)), device)
    except StopIteration:
        raise PrunekitError("the data yielded no batch; pass at least one batch") from None
    objective = infer_objective(loss, model, first)
    with model_mode(model, training=False):
        probe(objective, model, first)
    return objective, first


def _coupling(model: nn.Module, budget: Budget, targets: list[Target], data: Any,
              device: torch.device) -> ChannelGroups | None:
    """The model's coupled channel groups, which structure `groups` ranks (None for the other structures)."""
    if budget.structure != "groups":
        return None
    return channel_groups(model, _example_inputs(model, data, device), [t.name for t in targets])


def _example_inputs(model: nn.Module, data: Any, device: torch.device) -> Any:
    """What the channel trace runs the model on: the first batch's inputs, else zeros of `model.input_shape`."""
    batch = None if data is None else next(iter(data), None)
    if batch is not None:
        return without_labels(to_device(batch, device))
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise PrunekitError("structure 'groups' runs the model once to find which channels are coupled: pass "
                            "data (batches of inputs) or give the model an input_shape attribute, e.g. (3, 32, 32)")
    return torch.zeros(2, *shape, device=device)


def _budget(budget: str | Budget, **parts: Any) -> Budget:
    """A Budget from an allocation name and its parts; a Budget object already has them, so none may be given."""
    given = {name: value for name, value in parts.items() if value is not None}
    if not isinstance(budget, Budget):
        return Budget(budget, **given)
    if given:
        raise PrunekitError(f"{', '.join(given)} given beside a Budget object, which already sets them; "
                            f"put them in the Budget (Budget(..., {next(iter(given))}=...)) or pass budget by name")
    return budget


def _resolve_sparsity(sparsity: float | None, budget: Budget) -> float:
    fixed = budget.fixed_sparsity
    if fixed is None:
        return check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
    if sparsity is not None and abs(sparsity - fixed) > 1e-9:
        raise PrunekitError(f"{budget.n}:{budget.m} sparsity is always {fixed:g}; drop --sparsity or set it to "
                            f"{fixed:g}")
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


def _layer_results(targets: list[Target], masks: Mapping[str, torch.Tensor], plan: Plan) -> list[LayerResult]:
    requested = plan.requested()
    return [LayerResult(t.name, tuple(t.shape), t.numel, requested[t.name], mask_sparsity({t.name: masks[t.name]}))
            for t in targets]
