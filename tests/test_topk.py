import pytest
import torch

from prunekit.budgets import Budget
from prunekit.errors import PrunekitError
from prunekit.methods._topk import TrackedTopK

SHAPES = {"conv.weight": torch.Size([8, 3, 3, 3]), "fc1.weight": torch.Size([40, 50]), "fc2.weight": torch.Size([10, 40])}


def drifting_scores(steps: int, step_size: float, seed: int = 0):
    """Scores that take small random steps, as BiP's scores do between two projections."""
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.randn(shape, generator=generator).abs() for name, shape in SHAPES.items()}
    for _ in range(steps):
        yield scores
        scores = {name: (s + step_size * torch.randn(s.shape, generator=generator)).abs()
                  for name, s in scores.items()}


@pytest.mark.parametrize("budget", [Budget(), Budget("uniform"), Budget(layer_sparsity={"^fc2": 0.5})],
                         ids=["global", "uniform", "override"])
@pytest.mark.parametrize("step_size", [1e-4, 1e-2, 1.0], ids=["small", "medium", "jump"])
def test_tracked_selection_is_the_plans_bit_for_bit_while_scores_drift(budget, step_size):
    plan = budget.plan(SHAPES, 0.9)
    tracked = TrackedTopK(plan)
    for scores in drifting_scores(30, step_size):
        ours, reference = tracked.select(scores), plan.select(scores)
        assert all(torch.equal(ours[name], reference[name]) for name in SHAPES)


def test_ties_at_the_cut_are_pruned_in_index_order_as_the_plan_does():
    plan = Budget().plan(SHAPES, 0.7)
    tracked = TrackedTopK(plan)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):  # a few distinct values: most of the cut is ties
        scores = {name: torch.randint(0, 4, shape, generator=generator).float() for name, shape in SHAPES.items()}
        ours, reference = tracked.select(scores), plan.select(scores)
        assert all(torch.equal(ours[name], reference[name]) for name in SHAPES)


def test_the_band_widens_after_jumps_and_narrows_again_to_a_small_share_of_the_scores():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.9))
    jumps = drifting_scores(5, 1.0)
    tracked.select(next(jumps))
    first_width = tracked.cuts[0].width
    for scores in jumps:  # the cut leaves the band: it widens
        tracked.select(scores)
    assert tracked.cuts[0].width > first_width
    for scores in drifting_scores(40, 1e-4, seed=1):
        tracked.select(scores)
    cut = tracked.cuts[0]
    values = torch.cat([s.reshape(-1) for s in scores.values()])
    inside = int(((values - cut.value).abs() <= cut.width).sum())
    assert 0 < inside <= 0.05 * values.numel()


def test_scores_that_are_not_finite_get_the_plans_error():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.9))
    scores = next(drifting_scores(1, 0.0))
    tracked.select(scores)
    scores["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="fc1.weight contain NaN"):
        tracked.select(scores)


def test_nothing_pruned_at_sparsity_zero():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.0))
    masks = tracked.select(next(drifting_scores(1, 0.0)))
    assert all(mask.all() for mask in masks.values())
