"""GMP (DPF's schedule without feedback) and one-shot pruning with fine-tuning."""
import pytest
import torch
import torch.nn.functional as F
from test_dpf import FAST, ForwardWatch, Snapshots, mlp, synthetic_loader
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.masks import get_masks
from prunekit.schedules import StepSchedule


def both(first, second):
    """One observer calling two."""
    def observe(model, event):
        first(model, event)
        second(model, event)
    return observe


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero_and_never_return(optimizer):
    watch, snapshots = ForwardWatch(), Snapshots()
    lr = 0.1 if optimizer == "sgd" else 0.01
    result = prunekit.prune(mlp(), "gmp", 0.9, synthetic_loader(), observer=both(watch, snapshots), epochs=3, p=2,
                            **{**FAST, "lr": lr, "optimizer": optimizer})
    assert len(watch.dense) == 60 and max(watch.largest_pruned) == 0  # momentum and moments cannot move them
    assert all(event["reactivated"] == 0 and event["pruning_error"] == 0 for event in result.history)
    for before, after in zip(snapshots.masks, snapshots.masks[1:]):
        assert all(not (after[n] & ~before[n]).any() for n in after)  # the pruned set only grows


def test_same_schedule_as_dpf_and_no_updates_after_its_end():
    snapshots = Snapshots()
    result = prunekit.prune(mlp(), "gmp", 0.95, synthetic_loader(), observer=snapshots, epochs=3, p=5, start=0.1,
                            end=0.6, **FAST)
    schedule = StepSchedule(0.95, start=6, end=36, shape="cubic")
    total = sum(m.numel() for m in result.masks.values())
    assert [event["step"] for event in result.history] == [*range(0, 36, 5), 36]
    for event, masks in zip(result.history, snapshots.masks):
        assert event["scheduled"] == schedule(event["step"])
        assert sum(int((~m).sum()) for m in masks.values()) == round(schedule(event["step"]) * total)
    assert all(torch.equal(result.masks[n], snapshots.masks[-1][n]) for n in result.masks)


def test_gradient_is_masked():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    bias = model.bias.detach().clone()
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    watch = ForwardWatch()
    prunekit.prune(model, "gmp", 0.5, batches, observer=watch, epochs=1, p=1, start=0.0, end=0.0, lr=0.5,
                   momentum=0.0, weight_decay=0.0, lr_schedule="constant")
    mask, w0, w1 = watch.masks[0]["weight"], watch.dense[0]["weight"], watch.dense[1]["weight"]
    assert int((~mask).sum()) == 9 and (w0[~mask] == 0).all()
    masked = w0.clone().requires_grad_()
    inputs, targets = batches[0]
    F.cross_entropy(inputs @ masked.T + bias, targets).backward()
    assert masked.grad[~mask].abs().min() > 0  # the loss does depend on the pruned weights ...
    torch.testing.assert_close(w1, w0 - 0.5 * mask * masked.grad)  # ... but they get no update


def test_layerwise_budget_prunes_every_layer_to_the_schedule():
    snapshots = Snapshots()
    prunekit.prune(mlp(), "gmp", 0.9, synthetic_loader(), budget="uniform", observer=snapshots, epochs=1, p=4,
                   **FAST)
    schedule = StepSchedule(0.9, start=0, end=15, shape="cubic")
    for event, masks in zip(snapshots.events, snapshots.masks):
        for mask in masks.values():
            assert int((~mask).sum()) == round(schedule(event["step"]) * mask.numel())


def test_bad_schedule_is_refused():
    with pytest.raises(PrunekitError, match="p=0 is invalid"):
        prunekit.prune(mlp(), "gmp", 0.9, synthetic_loader(), p=0)
    with pytest.raises(PrunekitError, match="end=0.2 is invalid"):
        prunekit.prune(mlp(), "gmp", 0.9, synthetic_loader(), start=0.3, end=0.2)


def test_oneshot_prunes_once_at_the_split_and_fine_tunes_with_the_mask_fixed():
    watch, snapshots = ForwardWatch(), Snapshots()
    result = prunekit.prune(mlp(), "oneshot-ft", 0.9, synthetic_loader(), observer=both(watch, snapshots), epochs=4,
                            prune_at=0.75, **FAST)
    assert [event["epoch"] for event in result.history] == [3]
    assert result.cost.backward_examples == 4 * 2000  # the same epoch budget as the other methods
    assert len(watch.dense) == 20 and max(watch.largest_pruned) == 0  # one fine-tuning epoch, pruned weights zero
    assert all(torch.equal(result.masks[n], snapshots.masks[0][n]) for n in result.masks)
    dense_at_pruning = snapshots.dense[0]
    threshold = min(dense_at_pruning[n][m].abs().min() for n, m in result.masks.items())
    assert all(dense_at_pruning[n][~m].abs().max() <= threshold for n, m in result.masks.items())
    assert result.sparsity == pytest.approx(round(0.9 * 4736) / 4736)


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 2, "prune_at": 0.9}, "leaves no fine-tuning epoch"),
    ({"epochs": 4, "prune_at": 0.1}, "leaves no dense epoch"),
    ({"prune_at": 1.0}, r"prune_at=1.0 is invalid"),
    ({"epochs": 5, "prune_at": 0.6, "warmup_epochs": 2.5}, r"the fine-tuning phase \(2 epochs\).*warmup_epochs"),
    ({"finetune_lr_scale": 0.0}, "finetune_lr_scale=0.0 is invalid"),
])
def test_oneshot_bad_split_is_refused_before_any_work(bad, message):
    model = mlp()
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(model, "oneshot-ft", 0.9, synthetic_loader(), **bad)
    assert not get_masks(model)
