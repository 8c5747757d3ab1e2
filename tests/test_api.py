import copy
import math
import time

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.targets import find_targets


def test_prune_is_three_lines_and_reports_per_layer(tiny_net):
    result = prunekit.prune(tiny_net, method="magnitude", sparsity=0.9)
    assert result.sparsity == pytest.approx(0.9, abs=1 / 1000)
    assert {layer.name for layer in result.layers} == {"conv.weight", "depthwise.weight", "fc.weight"}
    assert {s.name for s in result.skipped} >= {"conv.bias", "bn.weight", "fc.bias"}
    total = sum(layer.numel for layer in result.layers)
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.9 * total)
    assert "achieved" in str(result) and result.cost.seconds > 0


def test_uniform_requested_equals_achieved_per_layer(tiny_net):
    result = prunekit.prune(tiny_net, sparsity=0.5, budget="uniform")
    for layer in result.layers:
        assert layer.achieved == pytest.approx(layer.requested)
        assert layer.requested == pytest.approx(0.5, abs=1 / layer.numel)


def test_same_seed_same_masks_bit_for_bit(tiny_net):
    twin = copy.deepcopy(tiny_net)
    a = prunekit.prune(tiny_net, "random", 0.6, seed=7).masks
    b = prunekit.prune(twin, "random", 0.6, seed=7).masks
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_different_seeds_give_different_random_masks(tiny_net):
    twin = copy.deepcopy(tiny_net)
    a = prunekit.prune(tiny_net, "random", 0.6, seed=7).masks
    b = prunekit.prune(twin, "random", 0.6, seed=8).masks
    assert not all(torch.equal(a[n], b[n]) for n in a)


def test_structured_channels_skip_grouped_convs_with_reason(tiny_net):
    result = prunekit.prune(tiny_net, sparsity=0.5, structure="channels", budget="uniform")
    reasons = {s.name: s.reason for s in result.skipped}
    assert "grouped convolution" in reasons["depthwise.weight"]
    assert "depthwise.weight" not in result.masks
    for name, channels in (("conv.weight", 3), ("fc.weight", 32)):
        per_channel = result.masks[name].transpose(0, 1).reshape(channels, -1)
        assert (per_channel.all(1) | ~per_channel.any(1)).all()  # whole input channels
        assert int((~per_channel.any(1)).sum()) == round(0.5 * channels)


def test_erk_through_prune_keeps_the_formulas_count_per_layer(tiny_net):
    weights = {name: tiny_net.get_parameter(name).detach().abs().clone()
               for name in ("conv.weight", "depthwise.weight", "fc.weight")}
    result = prunekit.prune(tiny_net, "magnitude", 0.8, budget="erk")
    total = sum(w.numel() for w in weights.values())
    keep = total - round(0.8 * total)
    dims = {name: sum(w.shape) for name, w in weights.items()}
    for name, mask in result.masks.items():  # ε·Σdims kept weights per layer, ε making the total exact
        assert abs(int(mask.sum()) - keep * dims[name] / sum(dims.values())) < 1
        assert weights[name][mask].min() >= weights[name][~mask].max()
    assert sum(int(m.sum()) for m in result.masks.values()) == keep


def test_n_of_m_through_prune_keeps_the_largest_two_of_every_four(tiny_net):
    weight = tiny_net.fc.weight.detach().abs().clone()
    result = prunekit.prune(tiny_net, structure="nm", include=r"^fc\.")
    groups, kept = weight.reshape(-1, 4), result.masks["fc.weight"].reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    assert (groups.masked_fill(~kept, float("inf")).min(1).values
            >= groups.masked_fill(kept, float("-inf")).max(1).values).all()


def test_layer_sparsity_through_prune_overrides_and_the_rest_share_the_budget(tiny_net):
    result = prunekit.prune(tiny_net, sparsity=0.5, layer_sparsity={r"^fc\.": 0.9})
    pruned = {name: int((~mask).sum()) for name, mask in result.masks.items()}
    assert pruned["fc.weight"] == round(0.9 * 128)
    assert pruned["conv.weight"] + pruned["depthwise.weight"] == round(0.5 * (216 + 72))


def test_nm_sparsity_is_fixed(tiny_net):
    with pytest.raises(PrunekitError, match="2:4 sparsity is always 0.5"):
        prunekit.prune(tiny_net, structure="nm", sparsity=0.9)
    result = prunekit.prune(tiny_net, structure="nm", include=r"^fc\.")
    assert result.sparsity == 0.5


def test_include_exclude_by_regex(tiny_net):
    targets, skipped = find_targets(tiny_net, exclude=r"^fc\.")
    assert [t.name for t in targets] == ["conv.weight", "depthwise.weight"]
    assert any(s.name == "fc.weight" and "exclude" in s.reason for s in skipped)
    with pytest.raises(PrunekitError, match="matches no parameter"):
        find_targets(tiny_net, include="decoder")
    with pytest.raises(PrunekitError, match="not a valid regular expression"):
        find_targets(tiny_net, include="(")


@pytest.mark.parametrize("sparsity", [-0.5, 1.0, 2.0])
def test_sparsity_out_of_range(tiny_net, sparsity):
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        prunekit.prune(tiny_net, sparsity=sparsity)
    assert not any("parametrizations" in n for n, _ in tiny_net.named_parameters())


def test_unknown_method_and_hyperparameter(tiny_net):
    with pytest.raises(PrunekitError, match="unknown method 'magnitud'.*magnitude"):
        prunekit.prune(tiny_net, method="magnitud")
    with pytest.raises(PrunekitError, match="no hyperparameter 'temperature'"):
        prunekit.prune(tiny_net, method="magnitude", temperature=3)


def test_model_without_prunable_tensors():
    with pytest.raises(PrunekitError, match="no prunable tensors"):
        prunekit.prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_nan_weights_refused_before_work(tiny_net):
    with torch.no_grad():
        tiny_net.fc.weight[0, 0] = math.nan
    with pytest.raises(PrunekitError, match="fc.weight contains NaN"):
        prunekit.prune(tiny_net)
    assert not any("parametrizations" in n for n, _ in tiny_net.named_parameters())


def test_cost_meter_counts_passes(tiny_net, tiny_batches):
    from prunekit.cost import CostMeter

    with CostMeter(tiny_net) as meter:
        for x, y in tiny_batches:
            nn.functional.cross_entropy(tiny_net(x), y).backward()
        with torch.no_grad():
            tiny_net(tiny_batches[0][0])
    assert meter.cost.forward_passes == 5 and meter.cost.forward_examples == 80
    assert meter.cost.backward_passes == 4 and meter.cost.backward_examples == 64


def test_cost_meter_sees_memory_allocated_inside_it(tiny_net):
    from prunekit.cost import CostMeter

    size = 64 * 2**20
    with CostMeter(tiny_net) as meter:
        block = torch.ones(size, dtype=torch.uint8)  # written, so resident
        time.sleep(0.1)  # many sampling periods
        del block
    assert size <= meter.cost.peak_memory_bytes < 4 * size


def test_repruning_updates_masks_in_place(tiny_net):
    prunekit.prune(tiny_net, sparsity=0.5)
    result = prunekit.prune(tiny_net, sparsity=0.8)
    assert result.sparsity == pytest.approx(0.8, abs=1e-3)
    assert prunekit.sparsity_report(tiny_net).sparsity >= 0.8 - 1e-3
    assert sum(1 for m in tiny_net.modules() if type(m).__name__ == "Mask") == 3


def test_methods_lists_registry():
    assert {"magnitude", "random"} <= set(prunekit.methods())


def test_history_records_progress_with_cumulative_cost(tiny_net, tiny_batches):
    from dataclasses import dataclass

    from prunekit.methods import _REGISTRY, register

    @dataclass(frozen=True)
    class NoHparams:
        pass

    def two_stage(ctx, hp):
        for stage, sparsity in enumerate((0.5, ctx.sparsity)):
            for x, _ in ctx.data:
                ctx.model(x)
            ctx.record(stage=stage, sparsity=sparsity)
        return ctx.select({t.name: t.weight.abs() for t in ctx.targets})

    register("two-stage-test", NoHparams, "test only", needs_data=True)(two_stage)
    try:
        seen = []
        result = prunekit.prune(tiny_net, "two-stage-test", 0.8, tiny_batches,
                                observer=lambda model, event: seen.append((model(tiny_batches[0][0]).shape, event["stage"])))
    finally:
        del _REGISTRY["two-stage-test"]
    assert [event["stage"] for event in result.history] == [0, 1]
    assert seen == [(torch.Size([16, 4]), 0), (torch.Size([16, 4]), 1)]  # observer passes are not counted:
    assert [event["cost"]["forward_examples"] for event in result.history] == [64, 128]
    assert result.history[0]["cost"]["seconds"] <= result.history[1]["cost"]["seconds"] <= result.cost.seconds


def test_training_fields_owned_by_prune_are_refused_with_reason(tiny_net):
    with pytest.raises(PrunekitError, match="batch size of the data"):
        prunekit.prune(tiny_net, method="magnitude", batch_size=32)
