"""The stage engine and the budget plan: written once, used by every method."""
import copy

import pytest
import torch

import prunekit
from prunekit.budgets import Budget
from prunekit.cost import CostMeter
from prunekit.errors import PrunekitError
from prunekit.methods import PruneContext
from prunekit.methods._stages import Stages, run_stages
from prunekit.targets import find_targets


def context(model, sparsity=0.5, budget=None):
    meter = CostMeter(model)
    return PruneContext(model, find_targets(model)[0], sparsity, budget or Budget(), None, 0, meter)


def ranked(ctx, order):
    """Scores that rank the weights of every target by `order` (a permutation of their flat positions)."""
    scores, offset = {}, 0
    for target in ctx.targets:
        scores[target.name] = order[offset:offset + target.numel].reshape(target.shape).float()
        offset += target.numel
    return scores


def test_monotone_stages_never_bring_back_what_an_earlier_stage_pruned(tiny_net):
    ctx = context(tiny_net)
    total = sum(t.numel for t in ctx.targets)
    stages = Stages(ctx)
    first = stages.select(ranked(ctx, torch.arange(total)), 0.3)
    # The reversed order makes the pruned the best-scored weights: they must stay pruned all the same.
    second = stages.select(ranked(ctx, torch.arange(total).flip(0)), 0.6)
    pruned_before = torch.cat([(~first[n]).flatten() for n in first])
    kept_now = torch.cat([second[n].flatten() for n in second])
    assert not (pruned_before & kept_now).any()
    assert int((~kept_now).sum()) == round(0.6 * total)
    assert stages.churn == {"pruned": round(0.6 * total) - round(0.3 * total), "reactivated": 0, "overlap": 1.0}


def test_non_monotone_stages_may_reactivate_and_count_it(tiny_net):
    ctx = context(tiny_net)
    total = sum(t.numel for t in ctx.targets)
    stages = Stages(ctx, monotone=False)
    stages.select(ranked(ctx, torch.arange(total)), 0.3)
    stages.select(ranked(ctx, torch.arange(total).flip(0)), 0.3)
    pruned = round(0.3 * total)
    kept = total - pruned
    assert stages.churn == {"pruned": pruned, "reactivated": pruned, "overlap": (kept - pruned) / kept}


def test_run_stages_records_each_stage_with_its_schedule_achieved_sparsity_and_number(tiny_net):
    ctx = context(tiny_net, 0.8)
    total = sum(t.numel for t in ctx.targets)
    seen = []
    with ctx.meter:
        masks = run_stages(ctx, [0.2, 0.5, 0.8], lambda masks: {t.name: t.weight.detach().abs() for t in ctx.targets},
                           after=lambda masks: seen.append(sum(int(m.sum()) for m in masks.values())) or {"x": 1},
                           label="round", first=1)
    assert [event["round"] for event in ctx.history] == [1, 2, 3]
    assert [event["scheduled"] for event in ctx.history] == [0.2, 0.5, 0.8]
    assert [event["sparsity"] * total for event in ctx.history] == pytest.approx([round(s * total) for s in
                                                                                 (0.2, 0.5, 0.8)])
    assert seen == [total - round(s * total) for s in (0.2, 0.5, 0.8)] and ctx.history[0]["x"] == 1
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)


def test_the_plan_is_made_once_per_prune_and_once_per_stage_sparsity(tiny_net, tiny_batches, monkeypatch):
    made = []
    original = Budget.plan
    monkeypatch.setattr(Budget, "plan", lambda self, shapes, sparsity, *layouts: made.append(sparsity) or
                        original(self, shapes, sparsity, *layouts))
    prunekit.prune(tiny_net, "bip", 0.5, tiny_batches, epochs=2)  # a selection after every one of 8 steps
    assert made == [0.5]
    prunekit.prune(tiny_net, "magnitude", 0.5)  # one more prune, one more plan
    assert made == [0.5, 0.5]


def test_plan_counts_are_what_selection_and_the_report_read(tiny_net):
    targets = find_targets(tiny_net)[0]
    shapes = {t.name: t.shape for t in targets}
    plan = Budget("uniform", layer_sparsity={"fc": 0.25}).plan(shapes, 0.5)
    assert plan.counts == {"fc.weight": 32, "conv.weight": 108, "depthwise.weight": 36}
    assert plan.requested() == {"conv.weight": 0.5, "depthwise.weight": 0.5, "fc.weight": 0.25}
    assert plan.at(0.5) is plan and plan.at(0.7) is plan.at(0.7) and plan.at(0.7).counts["fc.weight"] == 32
    masks = plan.select({t.name: t.weight.detach().abs() for t in targets})
    assert {name: int((~mask).sum()) for name, mask in masks.items()} == plan.counts


def test_iterative_snip_rescores_the_pruned_network_at_each_stage(tiny_net, tiny_batches):
    result = prunekit.prune(tiny_net, "snip", 0.75, tiny_batches, stages=3)
    stages = [event for event in result.history if "stage" in event]
    assert [event["stage"] for event in stages] == [0, 1, 2]
    assert [event["scheduled"] for event in stages] == pytest.approx([1 - 0.25 ** (k / 3) for k in (1, 2, 3)])
    total = sum(m.numel() for m in result.masks.values())
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.75 * total)
    assert all(event["reactivated"] == 0 for event in stages)


def test_obd_in_stages_recomputes_the_fisher_at_each(tiny_net, tiny_batches):
    result = prunekit.prune(tiny_net, "obd", 0.6, tiny_batches * 2, fisher_samples=16, stages=2)
    assert result.cost.backward_examples == 2 * 16
    assert len([event for event in result.history if "stage" in event]) == 2


def test_a_budget_object_does_not_take_parts_beside_it(tiny_net):
    with pytest.raises(PrunekitError, match="structure given beside a Budget object"):
        prunekit.prune(tiny_net, "magnitude", 0.5, budget=Budget("uniform"), structure="filters")
    result = prunekit.prune(tiny_net, "magnitude", 0.5, budget=Budget("uniform", structure="filters"))
    assert result.budget.structure == "filters"


def test_gmp_ranks_by_any_scoring_methods_score_on_the_same_schedule(tiny_net, tiny_batches):
    twin = copy.deepcopy(tiny_net)
    by_magnitude = prunekit.prune(tiny_net, "gmp", 0.75, tiny_batches, epochs=2, p=2, lr=0.01)
    by_snip = prunekit.prune(twin, "gmp", 0.75, tiny_batches, epochs=2, p=2, lr=0.01, score="snip")
    for result in (by_magnitude, by_snip):
        total = sum(m.numel() for m in result.masks.values())
        assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.75 * total)
        assert [event["scheduled"] for event in result.history] == [e["scheduled"] for e in by_magnitude.history]
        assert all(event["reactivated"] == 0 for event in result.history)  # GMP's masks only shrink
    assert any(not torch.equal(by_magnitude.masks[n], by_snip.masks[n]) for n in by_snip.masks)
    with pytest.raises(PrunekitError, match=r"score='nope' is invalid: set it to one of magnitude, random, snip"):
        prunekit.prune(twin, "gmp", 0.75, tiny_batches, score="nope")
