"""The method registry: a name, a hyperparameter dataclass and a function producing masks.

A method is `run(ctx: PruneContext, hp) -> {tensor name: bool mask}`. Scoring methods compute
scores and call `ctx.select(scores)`; methods that train or solve for new weights may update the
model's weights too (`ctx.targets[i].dense`). Everything else — choosing tensors, budgets, applying
masks, measuring — is done once by `prunekit.prune`.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import hparams as hparams_lib
from ..budgets import Budget, Plan
from ..cost import CostMeter
from ..errors import PrunekitError
from ..masks import MASKED
from ..objectives import Objective
from ..targets import Target

TRAINING_GROUP = "training"  # the field holding a training method's TrainConfig


@dataclass
class PruneContext:
    """What a method sees: the model, its prunable tensors, the budget, data and a meter."""

    model: nn.Module
    targets: list[Target]
    sparsity: float
    budget: Budget
    data: Any
    seed: int
    meter: CostMeter
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[dict[str, Any]] = field(default_factory=list)
    observer: Callable[[nn.Module, dict[str, Any]], None] | None = None
    plan: Plan | None = None  # the budget's counts for these targets; made from the budget when not given
    objective: Objective | None = None  # what the data-driven methods minimise (None: no data was given)
    example_activations: int = 0  # bytes autograd saves for one example's loss (fisher.saved_activation_bytes)

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = self.budget.plan({t.name: t.shape for t in self.targets}, self.sparsity,
                                         {t.name: t.layout for t in self.targets})

    def select(self, scores: dict[str, torch.Tensor], sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Exact masks from scores under this prune's plan (at another sparsity for a stage)."""
        return self.plan.at(self.sparsity if sparsity is None else sparsity).select(scores)

    def record(self, **event: Any) -> None:
        """Log a point of the method's progress (a stage, a round, a mask update) with the cost so far.

        The caller's observer (if any) sees the model as it is at this point, e.g. to evaluate
        every IMP round; its own passes are not counted.
        """
        event = {**event, "cost": self.meter.snapshot().to_dict()}
        self.history.append(event)
        if self.observer is not None:
            with self.meter.paused():
                self.observer(self.model, event)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the prune's seed, so the same seed gives the same masks."""
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[PruneContext, Any], dict[str, torch.Tensor]]
    hparams: type
    summary: str
    needs_data: bool = False
    mask_mode: str = MASKED
    family: str = "one-shot"  # one of FAMILIES: how the method is meant to be used
    # Checks of the settings against this prune (budget, memory, data's size) that read no data:
    # prune() runs them before it reads the first batch, so a bad setting fails before any work.
    check: Callable[[PruneContext, Any], None] | None = None

    @property
    def trains(self) -> bool:
        """Whether the method trains the network: its hyperparameters hold a training group."""
        return TRAINING_GROUP in hparams_lib.groups(self.hparams)


# one-shot: prunes a trained model without training it; training: trains while or after pruning;
# at-init: scores an initialisation, then the sparse network is trained.
FAMILIES = ("one-shot", "training", "at-init")
_REGISTRY: dict[str, Method] = {}

def method_fields(method: Method) -> list[hparams_lib.FieldInfo]:
    """The hyperparameters a user sets for `method`, nested groups' settings flattened."""
    return hparams_lib.describe(method.hparams)


def register(name: str, hparams: type, summary: str, needs_data: bool = False, mask_mode: str = MASKED,
             family: str = "one-shot", check: Callable[[PruneContext, Any], None] | None = None):
    """Decorator adding a method function to the registry under `name`."""
    def decorate(run):
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} is registered twice")
        if family not in FAMILIES:
            raise RuntimeError(f"method {name!r}: family {family!r} is not one of {FAMILIES}")
        hparams_lib.describe(hparams)  # a setting named twice across groups fails here, at import
        _REGISTRY[name] = Method(name, run, hparams, summary, needs_data, mask_mode, family, check)
        return run
    return decorate


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise PrunekitError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))} "
                            "(list them with `prunekit methods`)")
    return _REGISTRY[name]


def all_methods() -> list[Method]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def _import_method_modules() -> None:
    """Each module in this package registers its methods when imported; no list to keep in sync."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()
