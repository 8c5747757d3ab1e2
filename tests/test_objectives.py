"""Objectives: what the Trainer and evaluate() minimise, for tuple and mapping batches."""
import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.objectives import CrossEntropy, LossFunction, Objective, as_objective, batch_examples, to_device
from prunekit.training import TrainConfig, Trainer, evaluate

from test_training import FEATURES, blobs, config, mlp, toy_loader


class Regression(Objective):
    """Mapping batches {"features", "value"}: mean squared error of model(features), no accuracy."""

    def loss(self, model, batch):
        outputs = model(batch["features"]).squeeze(1)
        return nn.functional.mse_loss(outputs, batch["value"]), outputs


class RegressionLoader:
    def __init__(self, batches: int = 6, batch_size: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(batches * batch_size, FEATURES, generator=generator)
        value = features @ torch.linspace(-1, 1, FEATURES)
        self.batches = [{"features": features[i:i + batch_size], "value": value[i:i + batch_size]}
                        for i in range(0, len(value), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_cross_entropy_matches_torch_and_counts_correct_predictions():
    inputs, targets = blobs(32)
    model = mlp()
    loss, logits = CrossEntropy(label_smoothing=0.1).loss(model, (inputs, targets))
    assert torch.equal(loss, nn.functional.cross_entropy(model(inputs), targets, label_smoothing=0.1))
    assert CrossEntropy().correct(logits, (inputs, targets)) == (logits.argmax(1) == targets).sum()


def test_as_objective_accepts_none_an_objective_or_a_callable():
    assert as_objective(None) == CrossEntropy()
    regression = Regression()
    assert as_objective(regression) is regression
    wrapped = as_objective(lambda model, batch: model(batch[0]).square().mean())
    assert isinstance(wrapped, LossFunction)
    loss, outputs = wrapped.loss(mlp(), blobs(8))
    assert loss.dim() == 0 and outputs is None and wrapped.correct(outputs, blobs(8)) is None
    with pytest.raises(PrunekitError, match="loss='mse' is invalid"):
        as_objective("mse")


def test_a_loss_that_is_not_a_scalar_is_refused():
    per_example = as_objective(lambda model, batch: model(batch[0]).square().mean(1))
    with pytest.raises(PrunekitError, match=r"returned \(8,\), not a scalar tensor.*\.mean\(\)"):
        per_example.loss(mlp(), blobs(8))


def test_cross_entropy_says_which_batches_it_takes():
    with pytest.raises(PrunekitError, match=r"\(inputs, targets\) batches, got a dict.*loss="):
        CrossEntropy().loss(mlp(), {"features": torch.zeros(2, FEATURES)})


def test_batches_move_to_the_device_and_count_their_examples():
    batch = {"ids": torch.zeros(5, 3, dtype=torch.long), "extra": "kept", "pair": (torch.ones(5), [torch.ones(2)])}
    moved = to_device(batch, "meta")
    assert moved["ids"].device.type == "meta" and moved["extra"] == "kept"
    assert moved["pair"][0].device.type == "meta" and moved["pair"][1][0].device.type == "meta"
    assert batch_examples(batch) == 5
    assert batch_examples((torch.zeros(7, 2), torch.zeros(7))) == 7
    with pytest.raises(PrunekitError, match="no tensor with a batch dimension"):
        batch_examples({"scale": torch.tensor(1.0)})


def test_trainer_and_evaluate_take_an_objective_on_mapping_batches():
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    loader = RegressionLoader()
    before = evaluate(model, loader, objective=Regression())
    history = Trainer(model, loader, TrainConfig(epochs=5, lr=0.05, weight_decay=0), loss=Regression(),
                      eval_loader=loader, progress=False).fit()
    after = evaluate(model, loader, objective=Regression())
    assert after["loss"] < 0.1 * before["loss"] and before["examples"] == 96
    assert "accuracy" not in after
    assert {"train_loss", "eval_loss"} <= history[-1].keys()
    assert not {"train_accuracy", "eval_accuracy"} & history[-1].keys()
    assert history[-1]["eval_loss"] == pytest.approx(after["loss"])


def test_a_callable_loss_trains_without_accuracy():
    def smoothed(model, batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets, label_smoothing=0.1)

    history = Trainer(mlp(), toy_loader(), config(), loss=smoothed, eval_loader=toy_loader(), progress=False).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert not {"train_accuracy", "eval_accuracy"} & history[-1].keys()


def test_the_default_objective_is_cross_entropy_with_the_configs_smoothing():
    explicit = Trainer(mlp(), toy_loader(), config(), loss=CrossEntropy(0.1), progress=False).fit()
    default = Trainer(mlp(), toy_loader(), config(label_smoothing=0.1), progress=False).fit()
    assert [m["train_loss"] for m in explicit] == [m["train_loss"] for m in default]
    assert [m["train_accuracy"] for m in explicit] == [m["train_accuracy"] for m in default]


def test_label_smoothing_with_a_loss_of_ones_own_is_refused():
    with pytest.raises(PrunekitError, match=r"label_smoothing=0\.1 applies to the default cross-entropy only"):
        Trainer(mlp(), toy_loader(), config(label_smoothing=0.1), loss=CrossEntropy(), progress=False)
