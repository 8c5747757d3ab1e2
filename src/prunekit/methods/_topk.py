"""The budget's exact top-k of scores that move a little each step (BiP and Hydra project every iteration).

`Plan.select` finds each pool's cut with a full `kthvalue`, which on LeNet-300's 266k scores took
a quarter of a BiP iteration. Between two steps the cut moves little, so `TrackedTopK` looks for
it in a narrow band around the last one: two comparisons over the scores, then `kthvalue` over
the few thousand inside the band. The result is the plan's selection bit for bit (the count-th
smallest value, ties pruned in index order). When the cut leaves the band, that step takes the
full `kthvalue` and the band widens; scores that are not finite go to `Plan.select`, which names
the tensor in its error.
Unstructured budgets only: structured ones rank a few hundred groups, which costs nothing.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..budgets import Plan

# The band holds about this share of a pool's entries once its width has adapted: wide enough that
# one step's moves rarely carry the cut out of it, narrow enough that its kthvalue costs nothing.
BAND_SHARE = 0.01


class TrackedTopK:
    """`plan.select(scores)` for unstructured plans, with each pool's cut found near the last one."""

    def __init__(self, plan: Plan):
        self.plan = plan
        # Pools as Plan.select ranks them: a tensor with its own count alone, the others together.
        own = [name for name in plan.shapes if name in plan.counts]
        shared = [name for name in plan.shapes if name not in plan.counts]
        self.pools = [([name], plan.counts[name]) for name in own] + ([(shared, plan.counts[None])] if shared else [])
        self.cuts: list[_Cut] = [_Cut() for _ in self.pools]

    def select(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for (names, count), cut in zip(self.pools, self.cuts):
            values = torch.cat([scores[name].detach().reshape(-1) for name in names])
            kept = cut.keep(values, count)
            if kept is None:
                return self.plan.select(scores)
            parts = kept.split([scores[name].numel() for name in names])
            masks.update({name: part.view(scores[name].shape) for name, part in zip(names, parts)})
        return masks


class _Cut:
    """One pool's count-th smallest value, remembered with the width of the band to look for it in next."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.width = 0.0

    def keep(self, values: torch.Tensor, count: int) -> torch.Tensor | None:
        """Boolean: False at the `count` smallest values (of equal ones the earlier), True elsewhere;
        None for values that are not finite."""
        if count == 0:
            return torch.ones_like(values, dtype=torch.bool)
        if not bool(torch.isfinite(values.sum())):  # one cheap pass; Plan.select names the tensor
            return None
        found = self._in_band(values, count) if self.value is not None else None
        below, ties = found if found is not None else self._everywhere(values, count)
        kept = values > self.value
        if count - below < ties:  # only the first of the values equal to the cut are pruned
            kept[torch.nonzero(values == self.value).flatten()[count - below:]] = True
        return kept

    def _in_band(self, values: torch.Tensor, count: int) -> tuple[int, int] | None:
        """(entries below the cut, entries equal to it), the cut found in the band; None if it left the band."""
        low, high = float(self.value) - self.width, float(self.value) + self.width
        below = values < low
        below_band = int(below.count_nonzero())
        band = values[below.logical_not_().logical_and_(values <= high)]
        if not below_band < count <= below_band + band.numel():
            self.width *= 4
            return None
        if band.numel() > 2 * BAND_SHARE * values.numel():
            self.width /= 2
        self.value = band.kthvalue(count - below_band).values
        return below_band + int((band < self.value).sum()), int((band == self.value).sum())

    def _everywhere(self, values: torch.Tensor, count: int) -> tuple[int, int]:
        self.value = values.kthvalue(count).values
        if self.width == 0.0:  # the first cut: a band holding about BAND_SHARE of the values around it
            share = max(1, round(BAND_SHARE * values.numel() / 2))
            low = values.kthvalue(max(1, count - share)).values
            high = values.kthvalue(min(values.numel(), count + share)).values
            self.width = max(float(high - low) / 2, float(self.value.abs()) * 1e-6, 1e-12)
        return int((values < self.value).sum()), int((values == self.value).sum())
