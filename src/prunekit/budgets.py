"""Scores to masks with exact counts.

Every selection sorts by score with a stable sort and cuts at an exact index, so ties are broken
by position and a requested count is always met exactly (never a threshold that ties can shift).
Sparsity is counted over the tensors given: unstructured budgets prune round(s * weights),
structured budgets prune round(s * groups), N:M keeps N of every M. `groups` counts coupled channel
groups (`channels.py`): a channel with every weight slice that carries it, so that its masks can
be removed physically (`prunekit.compact`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch

from .errors import PrunekitError
from .hparams import integer, one_of, setting, validate
from .targets import OUT_IN, Layout, Target

if TYPE_CHECKING:
    from .channels import ChannelGroups

ALLOCATIONS = ("global", "uniform", "erk")
STRUCTURES = ("unstructured", "nm", "filters", "channels", "groups")


@dataclass(frozen=True)
class Budget:
    """How a model-level sparsity becomes per-tensor masks."""

    allocation: str = setting("global", "global: one ranking over all tensors; uniform: the same sparsity per "
                              "tensor; erk: Erdős–Rényi-kernel densities (RigL)", one_of(*ALLOCATIONS),
                              flag="--budget")
    structure: str = setting("unstructured", "unstructured | nm (N of every M along the input dimension) | "
                             "filters (whole output filters) | channels (whole input channels) | groups (coupled "
                             "channels: every slice that carries one, physically removable)", one_of(*STRUCTURES))
    n: int = setting(2, "N of N:M sparsity (kept weights per group)", integer(1))
    m: int = setting(4, "M of N:M sparsity (group size)", integer(2))
    layer_sparsity: Mapping[str, float] | None = setting(
        None, "per-tensor sparsity overrides {name regex: sparsity}; other tensors share the model sparsity")

    def __post_init__(self) -> None:
        validate(self, "budget")  # a Budget is valid wherever it was made

    def check_relations(self) -> None:
        if self.structure == "nm" and not self.n < self.m:
            raise PrunekitError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m} (e.g. --n 2 --m 4)")
        if self.structure != "unstructured" and self.allocation == "erk":
            raise PrunekitError("ERK allocation is for unstructured sparsity; use global or uniform with "
                                f"structure {self.structure!r}")
        for pattern, value in (self.layer_sparsity or {}).items():
            check_sparsity(value, f"layer_sparsity[{pattern!r}]")

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity at 1 - N/M; other structures take the requested one."""
        return 1 - self.n / self.m if self.structure == "nm" else None

    def skip_reason(self, target: Target) -> str | None:
        """Why this structure cannot apply to a tensor (it is then left dense), or None."""
        inputs = _input_dim(target.shape, target.layout)
        if self.structure == "nm" and inputs % self.m:
            return f"input dimension {inputs} is not a multiple of M={self.m}"
        if self.structure == "channels" and target.groups > 1:
            return "grouped convolution: an input channel is not a whole slice of its weight"
        return None

    def plan(self, shapes: Mapping[str, torch.Size], sparsity: float,
             layouts: Mapping[str, Layout] | None = None, coupling: ChannelGroups | None = None) -> Plan:
        """The per-tensor counts of a prune of these tensors at `sparsity`: checked and matched once.

        `layouts` says where a tensor keeps its outputs and inputs (`Target.layout`); out × in when not given.
        `coupling` is the model's channel groups (`channels.channel_groups`), which structure `groups` ranks.
        """
        check_sparsity(sparsity)
        if self.structure == "groups" and coupling is None:
            raise PrunekitError("structure 'groups' needs the model's coupled channels: prune() finds them by "
                                "running the model once; a plan made by hand needs "
                                "coupling=prunekit.channels.channel_groups(model, example_inputs)")
        if self.structure == "groups" and not coupling.size:
            raise PrunekitError("no channel of this model can be removed as a whole coupled group ("
                                f"{coupling.describe_pinned() or 'no layer makes channels'}); use structure "
                                "filters or unstructured")
        # Under `groups` the overrides name families (by their first producer's weight), not tensors.
        ranked = coupling.family_sizes if self.structure == "groups" else shapes
        return Plan(self, dict(shapes), sparsity, self._overrides(ranked), dict(layouts or {}), coupling)

    def select(self, scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        """Masks of one selection (a plan made for it); repeated selections should keep the plan."""
        return self.plan({name: score.shape for name, score in scores.items()}, sparsity).select(scores)

    def _overrides(self, shapes: Mapping[str, torch.Size]) -> dict[str, float]:
        overrides: dict[str, float] = {}
        for pattern, value in (self.layer_sparsity or {}).items():
            matched = [name for name in shapes if re.search(pattern, name)]
            if not matched:
                raise PrunekitError(f"layer_sparsity pattern {pattern!r} matches no prunable tensor; "
                                    f"names look like {next(iter(shapes))!r}")
            overrides.update({name: value for name in matched if name not in overrides})
        return overrides


@dataclass
class Plan:
    """One prune's budget made concrete: how many groups each tensor loses, computed once.

    Selection, the solvers' pools and the report all read these counts. `counts[name]` is the
    number of groups (weights, filters or channels) pruned in a tensor with its own count; under a
    global allocation the other tensors are ranked together and share `counts[None]`.
    """

    budget: Budget
    shapes: dict[str, torch.Size]
    sparsity: float
    overrides: dict[str, float]
    layouts: dict[str, Layout] = field(default_factory=dict)  # out × in where a tensor has none
    coupling: ChannelGroups | None = None  # the channel groups that structure `groups` ranks
    counts: dict[str | None, int] = field(init=False)
    _stages: dict[float, Plan] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.counts = {} if self.budget.structure == "nm" else self._counts()

    @property
    def group_sizes(self) -> dict[str, int]:
        """Groups per tensor: weights (unstructured), output filters or input channels; for structure `groups`,
        coupled channel groups per family (named by its first producer's weight)."""
        structure = self.budget.structure
        if structure == "groups":
            return self.coupling.family_sizes
        return {name: _group_count(shape, structure, self.layout(name)) for name, shape in self.shapes.items()}

    @property
    def shared(self) -> list[str]:
        """The tensors ranked together under one global count (none under other allocations)."""
        return [name for name in self.shapes if name not in self.counts]

    def at(self, sparsity: float) -> Plan:
        """The same tensors at another sparsity (a stage, a schedule's step); each made once."""
        if sparsity == self.sparsity:
            return self
        if sparsity not in self._stages:
            self._stages[sparsity] = Plan(self.budget, self.shapes, check_sparsity(sparsity), self.overrides,
                                          self.layouts, self.coupling)
        return self._stages[sparsity]

    def select(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean masks (True = kept) that prune the lowest-scoring entries, exactly the planned counts."""
        _check_scores(scores)
        structure = self.budget.structure
        if structure == "nm":
            return {name: _n_of_m(score, self.budget.n, self.budget.m, self.layout(name))
                    for name, score in scores.items()}
        if structure == "groups":
            keep = _keep_groups(self.coupling.family_scores(scores), self.counts, keep_one_per_tensor=True)
            return self.coupling.masks(keep, scores)
        group_scores = {name: _group_scores(score, structure, self.layout(name)) for name, score in scores.items()}
        keep = _keep_groups(group_scores, self.counts, keep_one_per_tensor=structure != "unstructured")
        return {name: _expand(keep[name], scores[name].shape, structure, self.layout(name)) for name in scores}

    def layout(self, name: str) -> Layout:
        return self.layouts.get(name, OUT_IN)

    def requested(self) -> dict[str, float | None]:
        """Requested sparsity per tensor (None where a global ranking or, for coupled groups, the groups decide)."""
        if self.budget.fixed_sparsity is not None:
            return {name: self.budget.fixed_sparsity for name in self.shapes}
        if self.budget.structure == "groups":
            return {name: None for name in self.shapes}
        sizes = self.group_sizes
        return {name: self.counts[name] / sizes[name] if name in self.counts else None for name in self.shapes}

    def _counts(self) -> dict[str | None, int]:
        sizes = self.group_sizes
        counts: dict[str | None, int] = {name: round(value * sizes[name]) for name, value in self.overrides.items()}
        free = {name: size for name, size in sizes.items() if name not in self.overrides}
        if not free:
            return counts
        allocation = self.budget.allocation
        if allocation == "global":
            counts[None] = round(self.sparsity * sum(free.values()))
        elif allocation == "uniform":
            counts.update({name: round(self.sparsity * size) for name, size in free.items()})
        else:
            counts.update(_erk_counts({n: self.shapes[n] for n in free}, self.sparsity))
        return counts


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Sparsity must lie in [0, 1): pruning everything leaves no model."""
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
        raise PrunekitError(f"{what} must be a fraction in [0, 1), e.g. 0.9 for 90% zeros; got {value!r}")
    return float(value)


# ---------------------------------------------------------------- helpers

def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    for name, score in scores.items():
        if not torch.isfinite(score).all():
            raise PrunekitError(f"scores for {name} contain NaN or infinity; check the weights "
                                "(prunekit.sparsity_report) and the method's inputs")


def _input_dim(shape: torch.Size, layout: Layout) -> int:
    return shape[layout.input_dim] if len(shape) > 1 else shape[0]


def _group_dim(structure: str, layout: Layout) -> int | None:
    """The dimension whose slices are the groups: output filters or input channels (None: single weights)."""
    return {"filters": layout.output_dim, "channels": layout.input_dim}.get(structure)


def _group_count(shape: torch.Size, structure: str, layout: Layout) -> int:
    dim = _group_dim(structure, layout)
    return math.prod(shape) if dim is None else shape[dim]


def _group_scores(score: torch.Tensor, structure: str, layout: Layout) -> torch.Tensor:
    """Per-group score: the mean over the group, so groups of different sizes compare fairly."""
    dim = _group_dim(structure, layout)
    if dim is None:
        return score.reshape(-1)
    return score.movedim(dim, 0).reshape(score.shape[dim], -1).mean(dim=1)


def _expand(keep: torch.Tensor, shape: torch.Size, structure: str, layout: Layout) -> torch.Tensor:
    """Group decisions back to the stored shape: each group's verdict over its whole slice."""
    dim = _group_dim(structure, layout)
    if dim is None:
        return keep.view(shape)
    view = [1] * len(shape)
    view[dim] = -1
    return keep.view(view).expand(shape).clone()


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean: True at the `count` smallest values, ties going to the earlier index.

    The same set a stable ascending sort would cut, found in linear time (this runs every step
    in BiP, Hydra and DPF): everything below the count-th value, then the first ties in index order.
    """
    pruned = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count == 0:
        return pruned
    threshold = torch.kthvalue(values, count).values
    pruned = values < threshold
    ties = torch.nonzero(values == threshold).flatten()
    pruned[ties[: count - int(pruned.sum())]] = True
    return pruned


def keep_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean: True at the `count` largest values; of equal values the earlier ones are dropped first."""
    return ~_lowest(values, values.numel() - count)


def _keep_groups(group_scores: Mapping[str, torch.Tensor], counts: Mapping,
                 keep_one_per_tensor: bool) -> dict[str, torch.Tensor]:
    keep = {name: ~_lowest(score, counts[name]) for name, score in group_scores.items() if name in counts}
    free = [name for name in group_scores if name not in counts]
    if free:
        keep.update(_keep_globally({n: group_scores[n] for n in free}, counts[None], keep_one_per_tensor))
    return keep


def _keep_globally(group_scores: Mapping[str, torch.Tensor], count: int,
                   keep_one_per_tensor: bool) -> dict[str, torch.Tensor]:
    """One ranking over the concatenated scores of all tensors."""
    names = list(group_scores)
    flat = torch.cat([group_scores[n].detach().reshape(-1) for n in names])
    sizes = [group_scores[n].numel() for n in names]
    if keep_one_per_tensor:
        # A structured global ranking must not remove a whole layer: it would cut the network.
        # Each tensor's best group is exempt, so the count is still met exactly.
        if count > flat.numel() - len(names):
            raise PrunekitError(f"cannot prune {count} groups and keep one per tensor; lower the sparsity")
        flat = flat.clone()
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        best = torch.stack([chunk.argmax() for chunk in flat.split(sizes)]) + offsets.to(flat.device)
        flat[best] = torch.inf
    kept = ~_lowest(flat, count)
    return {name: part.to(group_scores[name].device) for name, part in zip(names, kept.split(sizes))}


def _n_of_m(score: torch.Tensor, n: int, m: int, layout: Layout) -> torch.Tensor:
    """Keep the N highest of every M consecutive weights along the input dimension."""
    inputs = layout.input_dim if score.dim() > 1 else 0
    moved = score.movedim(inputs, -1)
    rows = moved.reshape(-1, m)
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(moved.shape).movedim(-1, inputs)


def _erk_counts(shapes: Mapping[str, torch.Size], sparsity: float) -> dict[str, int]:
    """Erdős–Rényi-kernel: density ∝ sum(shape)/prod(shape), capped at 1, exact total."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total_keep = sum(sizes.values()) - round(sparsity * sum(sizes.values()))
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = total_keep - sum(sizes[n] for n in dense)
        scale = budget / sum(raw[n] * sizes[n] for n in sizes if n not in dense)
        over = {n for n in sizes if n not in dense and raw[n] * scale > 1}
        if not over:
            break
        dense |= over
    keep = {n: float(sizes[n]) if n in dense else raw[n] * scale * sizes[n] for n in sizes}
    kept = _round_preserving_sum(keep, total_keep)
    return {n: sizes[n] - kept[n] for n in sizes}


def _round_preserving_sum(values: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding: integers that sum to `total`."""
    floors = {n: math.floor(v) for n, v in values.items()}
    short = total - sum(floors.values())
    by_remainder = sorted(values, key=lambda n: values[n] - floors[n], reverse=True)
    for name in by_remainder[:short]:
        floors[name] += 1
    return floors
