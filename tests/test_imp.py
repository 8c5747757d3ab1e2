"""IMP and OMP: exact round sparsities, rewinding, per-round history, and refused hyperparameters."""
import copy
import itertools

import pytest
import torch
from torch import nn

import prunekit
from prunekit.checkpoints import save_model
from prunekit.errors import PrunekitError
from prunekit.masks import get_masks, sparsity_report
from prunekit.methods.imp import snapshot

PRUNABLE = 16 * 12 + 12 * 4  # the weights of `mlp()`; biases are not pruned


def mlp(seed: int = 0, hidden: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


@pytest.fixture
def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4, 4, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(2)]


class StatesAtEpochStart:
    """The batches, plus a copy of the model's (masked) state each time the Trainer starts an epoch."""

    def __init__(self, model: nn.Module, batches):
        self.model, self.batches, self.states = model, batches, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.states.append(snapshot(self.model))


def masked(state: dict, masks: dict) -> dict:
    return {name: value * masks[name] if name in masks else value for name, value in state.items()}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert torch.equal(value, expected[name]), name


def test_imp_sparsity_after_r_rounds_is_one_minus_0_8_to_the_r_exactly(batches):
    # The rule: after round r exactly round((1 - 0.8^r) * N) of the N prunable weights are zero
    # (Python's round), except the last round, which stops at round(target * N).
    seen = []
    result = prunekit.prune(mlp(), "imp", 0.9, batches, epochs=1,
                            observer=lambda model, event: seen.append(get_masks(model)))
    assert [event["round"] for event in result.history] == list(range(1, 12))  # 0.8^10 > 0.1 > 0.8^11
    for r, masks in enumerate(seen, start=1):
        zeros = sum(int((~mask).sum()) for mask in masks.values())
        assert zeros == (round((1 - 0.8 ** r) * PRUNABLE) if r < 11 else round(0.9 * PRUNABLE)), r
    for before, after in itertools.pairwise(seen):  # each round prunes among the survivors only
        assert not any((after[name] & ~before[name]).any() for name in after)
    assert result.sparsity == round(0.9 * PRUNABLE) / PRUNABLE


def test_every_round_is_recorded_with_its_cumulative_cost(batches):
    events = []
    result = prunekit.prune(mlp(), "imp", 0.5, batches, epochs=2,
                            observer=lambda model, event: events.append((event, sparsity_report(model).sparsity)))
    assert result.history == [event for event, _ in events]
    assert [event["round"] for event, _ in events] == [1, 2, 3, 4]
    assert [event["sparsity"] for event, _ in events] == [round(s * PRUNABLE) / PRUNABLE
                                                          for s in (0.2, 0.36, 0.488, 0.5)]
    assert all(event["sparsity"] == model_sparsity for event, model_sparsity in events)
    per_round = 2 * 16  # epochs x examples; the observer's own passes are not counted
    assert [event["cost"]["backward_examples"] for event, _ in events] == [per_round * r for r in (1, 2, 3, 4)]
    assert result.cost.backward_examples == 4 * per_round


def test_weight_rewinding_returns_survivors_to_the_early_checkpoint(batches):
    model = mlp()
    data = StatesAtEpochStart(model, batches)
    masks = []
    result = prunekit.prune(model, "imp", 0.36, data, epochs=2, train_dense=True, rewind_epoch=1,
                            observer=lambda m, event: masks.append(get_masks(m)))
    assert (result.history[0]["round"], result.history[0]["sparsity"]) == (0, 0.0)  # the dense training
    # Epoch starts: dense 0, 1; round 1: 0, 1; round 2: 0, 1. The rewind point is after one dense epoch.
    init, early, round1, round2 = data.states[0], data.states[1], data.states[2], data.states[4]
    assert not torch.equal(init["1.weight"], early["1.weight"])
    assert_same_state(round1, masked(early, masks[1]))  # biases are rewound too
    assert_same_state(round2, masked(early, masks[2]))


def test_rewind_epoch_zero_is_the_original_lottery_ticket(batches):
    model = mlp()
    data = StatesAtEpochStart(model, batches)
    masks = []
    prunekit.prune(model, "imp", 0.2, data, epochs=1, train_dense=True, rewind_epoch=0,
                   observer=lambda m, event: masks.append(get_masks(m)))
    assert_same_state(data.states[1], masked(data.states[0], masks[1]))


def test_lr_rewinding_keeps_the_trained_survivors(batches):
    model = mlp()
    data = StatesAtEpochStart(model, batches)
    trained, masks = [], []

    def observe(m, event):
        trained.append(snapshot(m))
        masks.append(get_masks(m))

    prunekit.prune(model, "imp", 0.36, data, epochs=1, train_dense=True, rewind="lr", observer=observe)
    assert_same_state(data.states[1], masked(trained[0], masks[1]))
    assert_same_state(data.states[2], masked(trained[1], masks[2]))


def test_rewind_weights_file_or_the_given_weights(batches, tmp_path):
    model = mlp()
    first_masks = prunekit.prune(copy.deepcopy(model), "magnitude", 0.2).masks
    early = mlp(seed=5)
    save_model(early, tmp_path / "early.safetensors", {})
    for rewind_weights, expected in ((str(tmp_path / "early.safetensors"), snapshot(early)), (None, snapshot(model))):
        given = copy.deepcopy(model)
        data = StatesAtEpochStart(given, batches)
        prunekit.prune(given, "imp", 0.2, data, epochs=1, rewind_weights=rewind_weights)
        assert_same_state(data.states[0], masked(expected, first_masks))


def test_omp_prunes_the_trained_weights_once_by_global_magnitude(batches):
    model = mlp()
    expected = prunekit.prune(copy.deepcopy(model), "magnitude", 0.7).masks
    before = model[1].weight.detach().clone()
    result = prunekit.prune(model, "omp", 0.7, batches, epochs=1, rewind="lr")
    assert all(torch.equal(result.masks[name], expected[name]) for name in expected)
    assert [(e["round"], e["sparsity"]) for e in result.history] == [(1, round(0.7 * PRUNABLE) / PRUNABLE)]
    kept = result.masks["1.weight"]
    assert (model[1].weight[~kept] == 0).all()
    assert not torch.equal(model[1].weight[kept], before[kept])  # retrained
    assert result.cost.backward_examples == 16


@pytest.mark.parametrize("hparams, message", [
    ({"rate": 0.0}, r"rate=0.0 is invalid: set it to a number in \(0, 1\) \(--rate\)"),
    ({"rate": 1.0}, r"rate=1.0 is invalid: set it to a number in \(0, 1\)"),
    ({"rewind": "init"}, "rewind='init' is invalid: set it to one of weights, lr"),
    ({"train_dense": True, "epochs": 2, "rewind_epoch": 2}, r"rewind_epoch=2.0 must be in \[0, epochs=2\)"),
    ({"train_dense": True, "rewind_weights": "early.safetensors"}, "both set the rewind point"),
    ({"rewind": "lr", "rewind_weights": "early.safetensors"}, "only used by weight rewinding"),
    ({"rewind_weights": "missing.safetensors"}, "rewind_weights file missing.safetensors does not exist"),
    ({"epochs": 0}, r"epochs=0 is invalid: set it to an integer >= 1 \(--epochs\)"),
    ({"structure": "nm"}, "N:M sparsity is fixed"),
])
def test_bad_hyperparameters_are_refused_before_any_work(batches, hparams, message):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(model, "imp", 0.5, batches, **hparams)
    assert not get_masks(model)
    assert_same_state(snapshot(model), before)


def test_data_problems_are_refused_before_any_work(batches, tmp_path):
    model = mlp()
    with pytest.raises(PrunekitError, match="needs data"):
        prunekit.prune(model, "omp", 0.5)
    with pytest.raises(PrunekitError, match=r"needs len\(\)"):
        prunekit.prune(model, "omp", 0.5, iter(batches))
    save_model(mlp(hidden=10), tmp_path / "other.safetensors", {})
    before = snapshot(model)
    with pytest.raises(PrunekitError, match="does not fit the model"):
        prunekit.prune(model, "imp", 0.5, batches, rewind_weights=str(tmp_path / "other.safetensors"))
    assert not get_masks(model)
    assert_same_state(snapshot(model), before)
