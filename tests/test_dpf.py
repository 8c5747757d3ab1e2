"""DPF: straight-through updates of the dense weights, the gradual schedule, the churn log, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.data import Loader, load_dataset
from prunekit.errors import PrunekitError
from prunekit.masks import get_masks
from prunekit.schedules import StepSchedule
from prunekit.targets import find_targets

FAST = {"lr": 0.1, "weight_decay": 5e-4, "lr_schedule": "constant"}


def synthetic_loader(batch_size: int = 100) -> Loader:
    """2000 examples of 1x8x8 in batches of 100: 20 steps per epoch."""
    return Loader.for_dataset(load_dataset("synthetic"), "train", batch_size, seed=0)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {t.name: t.dense.detach().clone() for t in find_targets(model)[0]}


class Snapshots:
    """An observer keeping the masks and dense weights at every recorded mask update."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.masks: list[dict[str, torch.Tensor]] = []
        self.dense: list[dict[str, torch.Tensor]] = []

    def __call__(self, model: nn.Module, event: dict) -> None:
        self.events.append(event)
        self.masks.append({n: m.clone() for n, m in get_masks(model).items()})
        self.dense.append(dense_weights(model))


class ForwardWatch:
    """An observer that, once attached, sees the dense weights and masks before every forward pass."""

    def __init__(self) -> None:
        self.dense: list[dict[str, torch.Tensor]] = []
        self.masks: list[dict[str, torch.Tensor]] = []
        self.hook = None

    def __call__(self, model: nn.Module, event: dict) -> None:
        if self.hook is None:
            self.hook = model.register_forward_pre_hook(lambda module, inputs: self._look(module))

    def _look(self, model: nn.Module) -> None:
        self.dense.append(dense_weights(model))
        self.masks.append({n: m.clone() for n, m in get_masks(model).items()})

    @property
    def largest_pruned(self) -> list[float]:
        """Largest |dense weight| under the mask at each forward pass."""
        return [max(float((dense[n] * ~masks[n]).abs().max()) for n in dense)
                for dense, masks in zip(self.dense, self.masks)]


def test_dense_weights_receive_the_gradient_taken_at_the_masked_weights():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    bias = model.bias.detach().clone()  # not pruned; step 0 uses its initial value
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(2)]
    snapshots = Snapshots()
    lr = 0.5
    # start = end = 0: the target mask from step 0 on; p = 1 without freezing shows the dense weights after step 0.
    prunekit.prune(model, "dpf", 0.5, batches, observer=snapshots, epochs=1, p=1, start=0.0, end=0.0, freeze=False,
                   lr=lr, momentum=0.0, weight_decay=0.0, lr_schedule="constant")
    mask, w0, w1 = snapshots.masks[0]["weight"], snapshots.dense[0]["weight"], snapshots.dense[1]["weight"]
    assert int((~mask).sum()) == 9
    masked = (mask * w0).requires_grad_()
    inputs, targets = batches[0]
    F.cross_entropy(inputs @ masked.T + bias, targets).backward()
    torch.testing.assert_close(w1, w0 - lr * masked.grad)
    assert masked.grad[~mask].abs().min() > 0  # the pruned weights did receive a gradient ...
    assert not torch.equal(w1[~mask], w0[~mask])  # ... and moved


def test_pruned_weights_keep_learning_and_come_back():
    watch = ForwardWatch()
    result = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), observer=watch, epochs=3, p=2, **FAST)
    assert max(watch.largest_pruned) > 0  # pruned weights are not zeroed during training
    assert sum(event["reactivated"] for event in result.history) > 0
    assert result.sparsity == pytest.approx(round(0.9 * 4736) / 4736)


def test_schedule_hits_the_target_exactly_at_its_end_and_sparsity_follows_it():
    snapshots = Snapshots()
    loader = synthetic_loader()
    # 3 epochs x 20 steps; the end, step 36, is not a multiple of p = 5 and is still an update.
    result = prunekit.prune(mlp(), "dpf", 0.95, loader, observer=snapshots, epochs=3, p=5, start=0.1, end=0.6,
                            freeze=False, **FAST)
    schedule = StepSchedule(0.95, start=6, end=36, shape="cubic")
    total = sum(m.numel() for m in result.masks.values())
    steps = [event["step"] for event in result.history]
    assert steps == [*range(0, 36, 5), 36, *range(40, 60, 5)]
    for event, masks in zip(result.history, snapshots.masks):
        assert event["scheduled"] == schedule(event["step"])
        zeros = sum(int((~m).sum()) for m in masks.values())
        assert zeros == round(schedule(event["step"]) * total)
        assert event["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    at_end = result.history[steps.index(36)]
    assert at_end["scheduled"] == 0.95 and at_end["sparsity"] == pytest.approx(round(0.95 * total) / total)
    assert result.history[steps.index(35)]["scheduled"] < 0.95


def test_churn_and_pruning_error_account_for_every_change_of_the_mask():
    snapshots = Snapshots()
    result = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), observer=snapshots, epochs=2, p=2, **FAST)
    previous = {n: torch.ones_like(m) for n, m in snapshots.masks[0].items()}
    for event, masks, dense in zip(result.history, snapshots.masks, snapshots.dense):
        pruned = sum(int((previous[n] & ~masks[n]).sum()) for n in masks)
        reactivated = sum(int((~previous[n] & masks[n]).sum()) for n in masks)
        kept = sum(int(masks[n].sum()) for n in masks)
        assert (event["pruned"], event["reactivated"]) == (pruned, reactivated)
        assert event["overlap"] == pytest.approx((kept - reactivated) / kept)
        left_out = sum(float(dense[n][~masks[n]].square().sum()) for n in masks)
        assert event["pruning_error"] == pytest.approx(left_out / sum(float(w.square().sum()) for w in dense.values()))
        previous = masks
    assert max(event["pruning_error"] for event in result.history) > 0  # pruned weights keep their values


def test_by_default_the_mask_freezes_when_the_schedule_ends_as_the_references_do():
    snapshots = Snapshots()
    result = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), observer=snapshots, epochs=2, p=4, end=0.5,
                            **FAST)
    assert [event["step"] for event in result.history] == list(range(0, 21, 4))  # the end is step 20
    assert all(torch.equal(result.masks[n], snapshots.masks[-1][n]) for n in result.masks)


def test_freeze_false_keeps_recomputing_the_mask_at_the_target_after_the_schedule():
    snapshots = Snapshots()
    result = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), observer=snapshots, epochs=2, p=4, end=0.5,
                            freeze=False, **FAST)
    steps = [event["step"] for event in result.history]
    assert steps == list(range(0, 21, 4)) + list(range(24, 40, 4))
    assert all(event["scheduled"] == 0.9 for event in result.history[steps.index(20):])
    assert sum(event["reactivated"] for event in result.history[steps.index(20) + 1:]) > 0  # it still changes


def test_gradient_clipping_bounds_the_step_of_the_dense_weights():
    def first_step(**clip):
        snapshots = Snapshots()
        prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), observer=snapshots, epochs=1, p=1, end=0.0,
                       freeze=False, lr=1.0, momentum=0.0, weight_decay=0.0, lr_schedule="constant", **clip)
        before, after = snapshots.dense[0], snapshots.dense[1]
        return float(torch.cat([(after[n] - before[n]).flatten() for n in before]).norm())

    assert first_step() > 0.1
    # The norm over every parameter is clipped; the pruned weights' straight-through gradients count too.
    assert first_step(grad_clip=0.01) <= 0.01 * (1 + 1e-5)


def test_conv_only_preset_leaves_the_linear_layer_dense_at_every_update(tiny_net, tiny_batches):
    snapshots = Snapshots()
    prunekit.prune(tiny_net, "dpf", 0.5, tiny_batches, observer=snapshots, layer_sparsity={r"^fc\.": 0.0},
                   epochs=2, p=1, **FAST)
    convolutions = ("conv.weight", "depthwise.weight")
    weights = sum(snapshots.masks[0][n].numel() for n in convolutions)
    for event, masks in zip(snapshots.events, snapshots.masks):
        assert masks["fc.weight"].all()
        assert sum(int((~masks[n]).sum()) for n in convolutions) == round(event["scheduled"] * weights)
    assert snapshots.events[-1]["scheduled"] == 0.5


def test_schedule_ending_with_training_still_finishes_at_the_target():
    result = prunekit.prune(mlp(), "dpf", 0.8, synthetic_loader(), epochs=1, p=3, end=1.0, **FAST)
    assert result.history[-1]["step"] == 20 and result.history[-1]["scheduled"] == 0.8
    assert result.sparsity == pytest.approx(round(0.8 * 4736) / 4736)


def test_final_model_is_the_masked_dense_model():
    model = mlp()
    result = prunekit.prune(model, "dpf", 0.9, synthetic_loader(), epochs=1, p=4, **FAST)
    for target in find_targets(model)[0]:
        mask = result.masks[target.name]
        assert torch.equal(target.weight == 0, ~mask | (target.dense == 0))
        assert (target.dense[~mask] == 0).all()  # attached in masked mode: the pruned weights are gone


def test_structured_variant_prunes_whole_filters_by_norm(tiny_net, tiny_batches):
    snapshots = Snapshots()
    result = prunekit.prune(tiny_net, "dpf", 0.5, tiny_batches, observer=snapshots, structure="filters", epochs=2,
                            p=1, **FAST)
    removed = 0
    for name, mask in result.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all()  # each filter is kept or removed whole
        removed += int((~rows.any(dim=1)).sum())
        kept = rows.any(dim=1)
        norms = snapshots.dense[-1][name].reshape(mask.shape[0], -1).norm(dim=1)  # the weights it was chosen from
        assert torch.equal(snapshots.masks[-1][name], mask)
        if (~kept).any():
            assert norms[kept].min() >= norms[~kept].max()
    assert removed == round(0.5 * (8 + 8 + 4))


def test_same_seed_same_masks_bit_for_bit():
    a = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), epochs=1, p=2, seed=3, **FAST).masks
    b = prunekit.prune(mlp(), "dpf", 0.9, synthetic_loader(), epochs=1, p=2, seed=3, **FAST).masks
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("bad, message", [
    ({"p": 0}, r"p=0 is invalid.*integer >= 1"),
    ({"p": -3}, r"p=-3 is invalid"),
    ({"start": 0.5, "end": 0.4}, r"end=0.4 is invalid: the schedule must end after it starts"),
    ({"end": 1.5}, r"end=1.5 is invalid"),
    ({"start": 1.0, "end": 1.0}, r"start=1.0 is invalid"),
    ({"sparsity": 1.0}, r"sparsity must be a fraction in \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity must be a fraction in \[0, 1\)"),
    ({"structure": "nm", "sparsity": None}, r"2:4 sparsity is fixed"),
    ({"epochs": 0}, r"epochs=0 is invalid"),
    ({"freeze": "sometimes"}, r"freeze must be true or false; got 'sometimes'"),
    ({"grad_clip": 0.0}, r"grad_clip=0.0 is invalid: set it to None or a finite number > 0"),
])
def test_bad_hyperparameters_are_refused_before_any_work(bad, message):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    arguments = {"sparsity": 0.9, **bad}
    sparsity, structure = arguments.pop("sparsity"), arguments.pop("structure", "unstructured")
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(model, "dpf", sparsity, synthetic_loader(), structure=structure, **arguments)
    assert not get_masks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_needs_data():
    with pytest.raises(PrunekitError, match="needs data"):
        prunekit.prune(mlp(), "dpf", 0.9)
