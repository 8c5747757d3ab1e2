"""Objectives: what the Trainer and evaluate() minimise, for tuple and mapping batches."""
import copy
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.objectives import (
    CausalLM,
    CrossEntropy,
    Distill,
    LossFunction,
    Objective,
    as_objective,
    batch_examples,
    concat_batches,
    to_device,
)
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
    assert CrossEntropy().measures(logits, (inputs, targets)) == {"accuracy": (logits.argmax(1) == targets).sum()}


def test_as_objective_accepts_none_an_objective_or_a_callable():
    assert as_objective(None) == CrossEntropy()
    regression = Regression()
    assert as_objective(regression) is regression
    wrapped = as_objective(lambda model, batch: model(batch[0]).square().mean())
    assert isinstance(wrapped, LossFunction)
    loss, outputs = wrapped.loss(mlp(), blobs(8))
    assert loss.dim() == 0 and outputs is None and wrapped.measures(outputs, blobs(8)) == {}
    with pytest.raises(PrunekitError, match="loss='mse' is invalid: set it to one of cross-entropy, causal-lm"):
        as_objective("mse")


def test_a_loss_that_is_not_a_scalar_is_refused():
    per_example = as_objective(lambda model, batch: model(batch[0]).square().mean(1))
    with pytest.raises(PrunekitError, match=r"returned \(8,\), not a scalar tensor.*\.mean\(\)"):
        per_example.loss(mlp(), blobs(8))


def test_cross_entropy_says_which_batches_it_takes():
    with pytest.raises(PrunekitError, match=r"the batch has no labels \(keys \['features'\]\).*loss='distill'"):
        CrossEntropy().loss(mlp(), {"features": torch.zeros(2, FEATURES)})
    with pytest.raises(PrunekitError, match=r"\(inputs, targets\) batches, got a Tensor.*loss="):
        CrossEntropy().loss(mlp(), torch.zeros(2, FEATURES))


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
        Trainer(mlp(), toy_loader(), config(label_smoothing=0.1), loss=lambda m, b: m(b[0]).mean(), progress=False)
    smoothed = Trainer(mlp(), toy_loader(), config(label_smoothing=0.1), loss=CrossEntropy(), progress=False)
    assert smoothed.objective == CrossEntropy(label_smoothing=0.1)  # a named cross-entropy takes the smoothing


# ---------------------------------------------------------------- prune(..., loss=)

class Output:
    """What a Hugging Face model returns: fields by name."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class KeywordClassifier(nn.Module):
    """Called as model(**batch); returns logits, and the loss when the batch has labels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, 16), nn.Linear(16, 3)

    def forward(self, features, labels=None):
        logits = self.fc2(torch.relu(self.fc1(features)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits=logits, loss=loss)


def keyword_batches(labels: bool = True, batches: int = 4):
    inputs, targets = blobs(16 * batches)
    return [{"features": inputs[i:i + 16], **({"labels": targets[i:i + 16]} if labels else {})}
            for i in range(0, len(targets), 16)]


# Settings that fit the tiny data: Fisher methods take 16 gradients, training methods one or two epochs.
SMALL = {"snip": {}, "grasp": {}, "obd": {"fisher_samples": 16}, "woodfisher": {"fisher_samples": 16},
         "chita": {"fisher_samples": 16}, "bip": {"epochs": 2, "lr": 0.05}, "gmp": {"epochs": 1}}


def pruned_fraction(result) -> float:
    return sum(int((~m).sum()) for m in result.masks.values()) / sum(m.numel() for m in result.masks.values())


@pytest.mark.parametrize("method", ["snip", "grasp", "obd", "woodfisher", "chita", "bip", "gmp"])
def test_mapping_batches_with_labels_prune_with_the_models_own_loss(method):
    torch.manual_seed(0)
    result = prunekit.prune(KeywordClassifier(), method, 0.5, keyword_batches(), **SMALL[method])
    assert pruned_fraction(result) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["obd", "chita", "woodfisher", "bip"])
def test_distill_needs_no_labels_and_training_brings_the_outputs_back(method):
    torch.manual_seed(0)
    model = KeywordClassifier()
    dense = copy.deepcopy(model)
    data = keyword_batches(labels=False)
    result = prunekit.prune(model, method, 0.6, data, loss="distill", **SMALL[method])
    assert pruned_fraction(result) == pytest.approx(0.6, abs=0.01)
    distill = as_objective("distill", dense)
    metrics = evaluate(model, data, objective=distill)
    assert 0.5 < metrics["cosine"] <= 1.0 and metrics["loss"] > 0
    assert evaluate(dense, data, objective=distill)["cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("solver", ["iht", "block"])
def test_chita_under_distill_keeps_the_first_order_term_where_the_held_out_examples_prefer_it(solver):
    torch.manual_seed(0)
    data = keyword_batches(labels=False)
    auto = prunekit.prune(KeywordClassifier(), "chita++", 0.6, data, loss="distill", solver=solver, stages=2,
                          **SMALL["chita"])
    assert {event["first_order"] for event in auto.history if "stage" in event} <= {True, False}
    fixed = prunekit.prune(KeywordClassifier(), "chita", 0.6, data, loss="distill", solver=solver, first_order=True,
                           **SMALL["chita"])
    assert fixed.history[-1]["first_order"] is True
    dense = KeywordClassifier()
    with pytest.raises(PrunekitError, match=r"--first-order true needs the loss's gradient at the scale of its "
                                            r"curvature, which the Distill objective does not give"):
        prunekit.prune(dense, "chita", 0.6, data, loss=Distill(dense, "kl"), solver=solver, first_order=True,
                       **SMALL["chita"])


def test_distill_frozen_on_examples_gives_the_same_loss_without_running_the_reference_again():
    torch.manual_seed(0)
    model, dense = KeywordClassifier(), KeywordClassifier()
    distill = as_objective("distill", dense)
    batch = keyword_batches(labels=False)[0]
    calls = []
    distill.reference.register_forward_hook(lambda *_: calls.append(1))
    objective, frozen = distill.frozen(batch)
    assert len(calls) == 1
    for _ in range(3):
        torch.testing.assert_close(objective.loss(model, frozen)[0], distill.loss(model, batch)[0])
    assert len(calls) == 1 + 3  # only the plain loss ran the reference
    assert CrossEntropy().frozen(batch) == (CrossEntropy(), batch)


def test_causal_lm_shifts_and_ignores_padding():
    vocabulary = 11
    model = nn.Sequential(nn.Embedding(vocabulary, 8), nn.Linear(8, vocabulary))
    wrapped = lambda input_ids, attention_mask=None: model(input_ids)  # noqa: E731
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, logits = CausalLM().loss(wrapped, {"input_ids": ids, "attention_mask": mask})
    pairs = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 6)]  # (row, position, next token) that count
    expected = torch.stack([nn.functional.cross_entropy(logits[r, t], torch.tensor(token)) for r, t, token in pairs])
    torch.testing.assert_close(loss, expected.mean())
    assert CausalLM().summary({"loss": 2.0})["perplexity"] == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_gradient_scores_under_distill_at_the_dense_model_are_refused_not_ranked_by_position(method):
    with pytest.raises(PrunekitError, match=r"^every weight's score is 0, so the selection would go by position alone"):
        prunekit.prune(KeywordClassifier(), method, 0.5, keyword_batches(labels=False), loss="distill")


@pytest.mark.parametrize("data, loss, message", [
    (keyword_batches(labels=False), None, r"cannot tell the loss of batches with keys \['features'\].*loss='distill'"),
    (keyword_batches(labels=False), "model", r"loss='model' .* needs `labels`"),
    ([{"pixels": torch.zeros(4, FEATURES)}], "distill", r"the model cannot take the data's batches.*TypeError"),
    (keyword_batches(), lambda m, b: m(**b).logits.sum(1), r"not a scalar tensor"),
    (keyword_batches(), lambda m, b: m(**b).loss * float("nan"), r"the loss on the first batch is nan"),
    (keyword_batches(), "hinge", r"loss='hinge' is invalid: set it to one of cross-entropy, causal-lm, model, distill"),
])
def test_bad_objectives_fail_in_one_line_before_any_work(data, loss, message):
    model = KeywordClassifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match=message) as error:
        prunekit.prune(model, "snip", 0.5, data, loss=loss)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_token_batches_of_different_lengths_join_padded_with_what_the_losses_ignore():
    short = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.ones(2, 3, dtype=torch.long)}
    long = {key: torch.full((1, 5), 2) for key in short}
    joined = concat_batches([short, long])
    assert joined["input_ids"].tolist() == [[1, 1, 1, 0, 0]] * 2 + [[2] * 5]
    assert joined["attention_mask"][:2, 3:].eq(0).all() and joined["labels"][:2, 3:].eq(-100).all()
    images = concat_batches([(torch.zeros(2, 3, 4, 4), torch.zeros(2)), (torch.ones(1, 3, 4, 4), torch.ones(1))])
    assert images[0].shape == (3, 3, 4, 4) and images[1].tolist() == [0, 0, 1]
