"""The budget's exact top-k of |scores| that move a little each step (BiP and Hydra project every iteration).

`Plan.select` finds each pool's cut with a full `kthvalue`, which on LeNet-300's 266k scores took
a quarter of a BiP iteration. Between two steps the cut moves little, so `TrackedTopK` looks for
it in a narrow band around the last one: one count below the band, then `kthvalue` over the few
thousand scores inside it. The result is the plan's selection bit for bit (the count-th smallest
value, ties pruned in index order), written as 0/1 into the masks the model multiplies by. When
the cut leaves the band, that step takes the full `kthvalue` and the band widens; scores that are
not finite go to `Plan.select`, which names the tensor in its error.
Unstructured budgets only: structured ones rank a few hundred groups, which costs nothing.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import reduce

import numpy as np
import torch

from ..budgets import Plan

# The band holds about this share of a pool's entries once its width has adapted: wide enough that
# one step's moves rarely carry the cut out of it, narrow enough that its kthvalue costs nothing.
BAND_SHARE = 0.01
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class TrackedTopK:
    """`plan.select` of |scores| for unstructured plans, with each pool's cut found near the last one."""

    def __init__(self, plan: Plan):
        self.plan = plan
        # Pools as Plan.select ranks them: a tensor with its own count alone, the others together.
        own = [name for name in plan.shapes if name in plan.counts]
        shared = [name for name in plan.shapes if name not in plan.counts]
        self.pools = [_Pool([name], plan.counts[name]) for name in own]
        if shared:
            self.pools.append(_Pool(shared, plan.counts[None]))

    def select_into(self, scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        """Write the selection of |scores| into `masks` (any dtype, the scores' shapes): 1 kept, 0 pruned."""
        for pool in self.pools:
            if not pool.select_into(scores, masks):
                for name, mask in self.plan.select({n: s.detach().abs() for n, s in scores.items()}).items():
                    masks[name].copy_(mask)
                return


class _Pool:
    """Tensors ranked together for one count: their |scores| laid end to end in one buffer."""

    def __init__(self, names: list[str], count: int):
        self.names = names
        self.count = count
        self.cut = _Cut()
        self.values: torch.Tensor | None = None

    def select_into(self, scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> bool:
        """Write this pool's masks; False (nothing written) when a score is not finite."""
        if self.count == 0:
            for name in self.names:
                masks[name].fill_(1)
            return True
        parts = self._load(scores)
        if not bool(torch.isfinite(self.values.sum())):  # one cheap pass; Plan.select names the tensor
            return False
        below, ties = self.cut.find(self.values, self.count)
        for name, part in zip(self.names, parts):
            torch.gt(part, self.cut.value, out=masks[name])
        if self.count - below < ties:  # only the first of the values equal to the cut are pruned
            self._keep_later_ties(masks, self.count - below)
        return True

    def _load(self, scores: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """|scores| into the buffer (cat's dtype promotion); its slices in the scores' shapes."""
        sizes = [scores[name].numel() for name in self.names]
        if self.values is None:
            dtype = reduce(torch.promote_types, (scores[name].dtype for name in self.names))
            self.values = torch.empty(sum(sizes), dtype=dtype, device=scores[self.names[0]].device)
        parts = [part.view(scores[name].shape) for name, part in zip(self.names, self.values.split(sizes))]
        for name, part in zip(self.names, parts):
            torch.abs(scores[name].detach(), out=part)
        return parts

    def _keep_later_ties(self, masks: Mapping[str, torch.Tensor], pruned_ties: int) -> None:
        kept_ties = torch.nonzero(self.values == self.cut.value).flatten()[pruned_ties:]
        start = 0
        for name in self.names:
            flat = masks[name].view(-1)
            inside = kept_ties[(kept_ties >= start) & (kept_ties < start + flat.numel())]
            flat[inside - start] = 1
            start += flat.numel()


def _band(values: torch.Tensor, low: float, high: float) -> tuple[int, torch.Tensor]:
    """(how many entries of `values` are below `low`, the entries in [low, high] in index order)."""
    if values.device.type == "cpu" and values.dtype in NUMPY_FLOATS:
        # numpy does this in about a third of torch's time on CPU, where torch's boolean comparisons,
        # counts and indexing took most of the projection of LeNet-300's scores; the results are the same.
        array = values.numpy()
        at_least_low = array >= low
        return array.size - int(np.count_nonzero(at_least_low)), torch.from_numpy(array[at_least_low & (array <= high)])
    at_least_low = values >= low
    return values.numel() - int(at_least_low.sum()), values[at_least_low & (values <= high)]


class _Cut:
    """One pool's count-th smallest value, remembered with the width of the band to look for it in next."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.width = 0.0

    def find(self, values: torch.Tensor, count: int) -> tuple[int, int]:
        """Set `value` to the count-th smallest of `values` (finite, count >= 1); (entries below it, entries
        equal to it)."""
        found = self._in_band(values, count) if self.value is not None else None
        return found if found is not None else self._everywhere(values, count)

    def _in_band(self, values: torch.Tensor, count: int) -> tuple[int, int] | None:
        """(entries below the cut, entries equal to it), the cut found in the band; None if it left the band."""
        low, high = float(self.value) - self.width, float(self.value) + self.width
        below_band, band = _band(values, low, high)
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
