import math

import pytest
import torch

from prunekit.budgets import Budget, check_sparsity
from prunekit.errors import PrunekitError


def scores(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(shape, generator=generator) for i, shape in enumerate(shapes)}


SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 128)]


def pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.987])
def test_global_prunes_exact_count_of_lowest_scores(sparsity):
    s = scores(*SHAPES)
    masks = Budget("global").select(s, sparsity)
    total = sum(v.numel() for v in s.values())
    assert pruned(masks) == round(sparsity * total)
    kept_min = min(v[m].min() for v, m in zip(s.values(), masks.values()) if m.any())
    pruned_max = max((v[~m].max() for v, m in zip(s.values(), masks.values()) if (~m).any()), default=-1)
    assert pruned_max <= kept_min


def test_global_ties_are_broken_by_position_not_threshold():
    s = {"a": torch.ones(10), "b": torch.ones(10)}
    masks = Budget("global").select(s, 0.35)
    assert pruned(masks) == 7
    assert masks["a"].tolist() == [False] * 7 + [True] * 3 and masks["b"].all()


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.95])
def test_uniform_gives_each_tensor_the_sparsity(sparsity):
    masks = Budget("uniform").select(scores(*SHAPES), sparsity)
    for mask in masks.values():
        assert int((~mask).sum()) == round(sparsity * mask.numel())


def erk_kept(shapes, sparsity):
    """RigL's Erdős–Rényi-kernel counts where no layer is capped: density_l = ε·Σdims_l/Πdims_l, so a layer
    keeps ε·Σdims_l weights, ε making the total exact."""
    total = sum(math.prod(shape) for shape in shapes)
    keep = total - round(sparsity * total)
    return [keep * sum(shape) / sum(sum(other) for other in shapes) for shape in shapes]


def test_erk_keeps_the_formulas_count_per_layer_and_the_exact_total():
    s = scores(*SHAPES)
    masks = Budget("erk").select(s, 0.9)
    total = sum(v.numel() for v in s.values())
    assert pruned(masks) == round(0.9 * total)
    for mask, expected in zip(masks.values(), erk_kept(SHAPES, 0.9)):
        assert abs(int(mask.sum()) - expected) < 1
    for score, mask in zip(s.values(), masks.values()):  # within a layer the highest scores are kept
        assert score[mask].min() > score[~mask].max()


def test_erk_caps_density_at_one_and_redistributes():
    s = scores((4, 2), (1000, 1000))
    masks = Budget("erk").select(s, 0.5)
    assert masks["t0"].all()
    assert pruned(masks) == round(0.5 * (8 + 10**6))


def test_layer_sparsity_overrides_named_tensors():
    masks = Budget("global", layer_sparsity={"t0": 0.25}).select(scores(*SHAPES), 0.8)
    assert int((~masks["t0"]).sum()) == round(0.25 * 16 * 27)
    free = 32 * 16 * 9 + 10 * 128
    assert int((~masks["t1"]).sum()) + int((~masks["t2"]).sum()) == round(0.8 * free)


def test_n_of_m_along_input_dimension():
    s = scores((8, 16, 3, 3), (6, 12))
    masks = Budget(structure="nm", n=2, m=4).select(s, 0.5)
    conv = masks["t0"].movedim(1, -1).reshape(-1, 4)
    assert (conv.sum(1) == 2).all()
    linear = masks["t1"].reshape(-1, 4)
    assert (linear.sum(1) == 2).all()
    # in every group the two kept are the two largest
    for groups, kept in ((s["t0"].movedim(1, -1).reshape(-1, 4), conv), (s["t1"].reshape(-1, 4), linear)):
        lowest_kept = groups.masked_fill(~kept, float("inf")).min(1).values
        highest_pruned = groups.masked_fill(kept, float("-inf")).max(1).values
        assert (lowest_kept > highest_pruned).all()


def test_filters_and_channels_remove_whole_groups():
    s = scores((8, 4, 3, 3), (6, 8))
    filters = Budget("uniform", structure="filters").select(s, 0.5)
    per_filter = filters["t0"].reshape(8, -1)
    assert ((per_filter.all(1)) | (~per_filter.any(1))).all() and int((~per_filter.any(1)).sum()) == 4
    channels = Budget("uniform", structure="channels").select(s, 0.25)
    per_channel = channels["t1"].t()
    assert int((~per_channel.any(1)).sum()) == 2 and ((per_channel.all(1)) | (~per_channel.any(1))).all()


def test_global_structured_never_removes_a_whole_layer():
    s = {"weak": torch.full((4, 3), 0.01), "strong": torch.rand(16, 3) + 1}
    masks = Budget("global", structure="filters").select(s, 0.3)
    assert masks["weak"].any()
    assert sum(int((~m.any(1)).sum()) for m in masks.values()) == round(0.3 * 20)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        check_sparsity(bad)


def test_bad_budget_settings_are_named():
    with pytest.raises(PrunekitError,
                       match=r"budget allocation='best' is invalid: set it to one of global, uniform, erk \(--budget\)"):
        Budget("best")
    with pytest.raises(PrunekitError, match="0 < N < M"):
        Budget(structure="nm", n=4, m=4)
    with pytest.raises(PrunekitError, match="ERK"):
        Budget("erk", structure="filters")
    with pytest.raises(PrunekitError, match="matches no prunable tensor"):
        Budget(layer_sparsity={"nope": 0.5}).select(scores((4, 4)), 0.5)


def test_nan_scores_are_refused():
    with pytest.raises(PrunekitError, match="NaN"):
        Budget().select({"a": torch.tensor([1.0, math.nan])}, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_linear_time_selection_equals_a_stable_sort(seed):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values: many ties, which a threshold would get wrong
    s = {"a": torch.randint(0, 4, (7, 9), generator=generator).float(),
         "b": torch.randint(0, 4, (40,), generator=generator).float()}
    count = int(torch.randint(0, 103, (1,), generator=generator))
    masks = Budget("global").select(s, count / 103)
    flat = torch.cat([s["a"].flatten(), s["b"]])
    expected = torch.ones(103, dtype=torch.bool)
    expected[torch.sort(flat, stable=True).indices[:count]] = False
    assert torch.equal(torch.cat([masks["a"].flatten(), masks["b"]]), expected)
