import pytest
import torch

from prunekit.budgets import Budget
from prunekit.errors import PrunekitError
from prunekit.methods._topk import TrackedTopK

SHAPES = {"conv.weight": torch.Size([8, 3, 3, 3]), "fc1.weight": torch.Size([40, 50]), "fc2.weight": torch.Size([10, 40])}


def drifting_scores(steps: int, step_size: float, seed: int = 0):
    """Signed scores that take small random steps, as BiP's scores do between two projections."""
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    for _ in range(steps):
        yield scores
        scores = {name: s + step_size * torch.randn(s.shape, generator=generator) for name, s in scores.items()}


def tracked_masks(tracked: TrackedTopK, scores: dict, dtype=torch.float32) -> dict:
    """The tracked selection as booleans, written through 0/1 masks of `dtype` as the model's are."""
    masks = {name: torch.full(score.shape, 0.5, dtype=dtype) for name, score in scores.items()}
    tracked.select_into(scores, masks)
    assert all(((mask == 0) | (mask == 1)).all() for mask in masks.values())
    return {name: mask.bool() for name, mask in masks.items()}


def assert_selection_is_the_plans(tracked: TrackedTopK, plan, scores: dict, mask_dtype=torch.float32) -> None:
    ours = tracked_masks(tracked, scores, mask_dtype)
    reference = plan.select({name: score.abs() for name, score in scores.items()})
    assert all(torch.equal(ours[name], reference[name]) for name in SHAPES)


@pytest.mark.parametrize("budget", [Budget(), Budget("uniform"), Budget(layer_sparsity={"^fc2": 0.5})],
                         ids=["global", "uniform", "override"])
@pytest.mark.parametrize("step_size", [1e-4, 1e-2, 1.0], ids=["small", "medium", "jump"])
def test_tracked_selection_is_the_plans_bit_for_bit_while_scores_drift(budget, step_size):
    plan = budget.plan(SHAPES, 0.9)
    tracked = TrackedTopK(plan)
    for step, scores in enumerate(drifting_scores(30, step_size)):
        mask_dtype = torch.float16 if step % 2 else torch.float32  # the model's masks are in its weights' dtype
        assert_selection_is_the_plans(tracked, plan, scores, mask_dtype)


def test_ties_at_the_cut_are_pruned_in_index_order_as_the_plan_does():
    plan = Budget().plan(SHAPES, 0.7)
    tracked = TrackedTopK(plan)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):  # a few distinct values: most of the cut is ties
        scores = {name: torch.randint(-3, 4, shape, generator=generator).float() for name, shape in SHAPES.items()}
        assert_selection_is_the_plans(tracked, plan, scores)


def test_the_band_widens_after_jumps_and_narrows_again_to_a_small_share_of_the_scores():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.9))
    jumps = drifting_scores(5, 1.0)
    tracked_masks(tracked, next(jumps))
    first_width = tracked.pools[0].cut.width
    for scores in jumps:  # the cut leaves the band: it widens
        tracked_masks(tracked, scores)
    assert tracked.pools[0].cut.width > first_width
    for scores in drifting_scores(40, 1e-4, seed=1):
        tracked_masks(tracked, scores)
    cut = tracked.pools[0].cut
    values = torch.cat([s.reshape(-1) for s in scores.values()]).abs()
    inside = int(((values - cut.value).abs() <= cut.width).sum())
    assert 0 < inside <= 0.05 * values.numel()


def test_scores_that_are_not_finite_get_the_plans_error():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.9))
    scores = next(drifting_scores(1, 0.0))
    tracked_masks(tracked, scores)
    scores["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="fc1.weight contain NaN"):
        tracked_masks(tracked, scores)


def test_nothing_pruned_at_sparsity_zero():
    tracked = TrackedTopK(Budget().plan(SHAPES, 0.0))
    masks = tracked_masks(tracked, next(drifting_scores(1, 0.0)))
    assert all(mask.all() for mask in masks.values())


def test_scores_numpy_cannot_hold_take_the_torch_path_to_the_same_selection():
    plan = Budget().plan(SHAPES, 0.9)
    tracked = TrackedTopK(plan)
    for scores in drifting_scores(10, 1e-2):
        scores = {name: score.bfloat16() for name, score in scores.items()}
        assert_selection_is_the_plans(tracked, plan, scores)
