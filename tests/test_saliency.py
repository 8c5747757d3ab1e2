"""SNIP, GraSP and SynFlow: scores against hand computations, SynFlow's independence of data, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.masks import get_masks
from prunekit.methods.saliency import grasp_scores, snip_scores, synflow_scores
from prunekit.targets import find_targets


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2, bias=False))


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(5, 3, generator=generator), torch.tensor([0, 1, 1, 0, 1])


def softmax_and_labels(weight, inputs, labels, temperature=1.0):
    return torch.softmax(inputs @ weight.T / temperature, dim=1), F.one_hot(labels, 2).float()


def pruned_set(masks: dict) -> set:
    return set(torch.nonzero(~masks["0.weight"].flatten()).flatten().tolist())


def test_snip_scores_are_abs_weight_times_gradient_by_hand(batch):
    model = linear()
    weight = model[0].weight.detach()
    inputs, labels = batch
    p, y = softmax_and_labels(weight, inputs, labels)
    gradient = (p - y).T @ inputs / len(inputs)  # mean cross-entropy of a linear softmax model
    expected = (weight * gradient).abs()
    scores = snip_scores(model, find_targets(model)[0], [batch])
    torch.testing.assert_close(scores["0.weight"], expected)
    masks = prunekit.prune(model, "snip", 0.5, [batch]).masks
    assert pruned_set(masks) == set(expected.flatten().argsort()[:3].tolist())  # the lowest are pruned


def test_grasp_scores_are_minus_weight_times_hessian_gradient_by_hand(batch):
    model = linear()
    weight = model[0].weight.detach().double()
    inputs, labels = batch[0].double(), batch[1]
    model.double()
    temperature = 3.0
    p, y = softmax_and_labels(weight, inputs, labels, temperature)
    g = (p - y).T @ inputs / (len(inputs) * temperature)
    # The gradient (p_n - y_n) x_nᵀ / (N T) moves along g by dp_n = (diag(p_n) - p_n p_nᵀ)(g x_n) / T.
    hessian_g = sum(torch.outer((torch.diag(pn) - torch.outer(pn, pn)) @ (g @ xn), xn) for pn, xn in zip(p, inputs))
    hessian_g = hessian_g / (len(inputs) * temperature ** 2)
    expected = -weight * hessian_g
    scores = grasp_scores(model, find_targets(model)[0], [(inputs, labels)], temperature=temperature)
    torch.testing.assert_close(scores["0.weight"], expected)
    # GraSP removes the HIGHEST scores.
    masks = prunekit.prune(model, "grasp", 0.5, [(inputs, labels)], temperature=temperature).masks
    assert pruned_set(masks) == set(expected.flatten().argsort(descending=True)[:3].tolist())


def test_synflow_scores_of_a_linear_chain_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    w1, w2 = (layer.weight.detach().double().abs() for layer in model)
    # R = 1ᵀ|W2||W1|1: a weight's flow is |w| times the paths through it.
    expected = {"0.weight": w1 * w2.sum(0)[:, None], "1.weight": w2 * w1.sum(1)[None, :]}
    scores = synflow_scores(model, find_targets(model)[0], (3,))
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value)
    kept = {"0.weight": torch.ones(4, 3, dtype=torch.bool), "1.weight": torch.ones(2, 4, dtype=torch.bool)}
    kept["0.weight"][1] = False  # hidden unit 1 gets no flow: its outgoing weights score 0
    masked = synflow_scores(model, find_targets(model)[0], (3,), kept)
    assert (masked["1.weight"][:, 1] == 0).all() and (masked["1.weight"][:, [0, 2, 3]] > 0).all()


def test_synflow_masks_do_not_depend_on_data(tiny_net, tiny_batches):
    tiny_net.input_shape = (3, 6, 6)
    tiny_net.bn.running_mean.uniform_(-1, 1)  # a sign that linearisation must not change
    before = copy.deepcopy(tiny_net.state_dict())
    other = [(torch.rand(3, 3, 6, 6) * 100, torch.zeros(3, dtype=torch.long))]
    results = [prunekit.prune(copy.deepcopy(tiny_net), "synflow", 0.8, data, iterations=20)
               for data in (None, tiny_batches, other)]
    for result in results[1:]:
        assert all(torch.equal(result.masks[name], results[0].masks[name]) for name in results[0].masks)
    assert results[0].cost.forward_passes == 20  # one all-ones input per iteration
    one_shot = prunekit.prune(copy.deepcopy(tiny_net), "synflow", 0.8, iterations=1).masks
    assert any(not torch.equal(one_shot[name], results[0].masks[name]) for name in one_shot)  # iterating matters
    model = copy.deepcopy(tiny_net)
    masks = prunekit.prune(model, "synflow", 0.8, iterations=20).masks
    assert model.training
    for name, value in model.state_dict().items():  # only the pruned weights changed: they are zero now
        if name.endswith(".original"):
            module = name.split(".parametrizations")[0]
            kept = masks[f"{module}.weight"]
            assert torch.equal(value[kept], before[f"{module}.weight"][kept]) and (value[~kept] == 0).all()
        elif name in before:
            assert torch.equal(value, before[name]), name


def test_pruning_then_training_holds_pruned_weights_at_zero(batch):
    model = linear()
    before = model[0].weight.detach().clone()
    result = prunekit.prune(model, "snip", 0.5, [batch, batch], epochs=2, lr=0.1)
    kept = result.masks["0.weight"]
    assert (model[0].weight[~kept] == 0).all()
    assert not torch.equal(model[0].weight[kept], before[kept])
    assert result.cost.backward_examples == 5 + 2 * 2 * 5  # one scoring batch, then 2 epochs of 2 batches


@pytest.mark.parametrize("method, hparams, message", [
    ("snip", {"epochs": -1}, r"epochs=-1 is invalid: set it to an integer >= 0"),
    ("snip", {"batches": 0}, r"batches=0 is invalid: set it to an integer >= 1"),
    ("snip", {"batches": 3}, "the scores need 3 batches but the data gave 1"),
    ("snip", {"epochs": 1, "lr": -1.0}, r"lr=-1.0 is invalid: set it to a finite number > 0"),
    ("grasp", {"temperature": 0.0}, r"temperature=0.0 is invalid: set it to a finite number > 0"),
    ("synflow", {"iterations": 0}, r"iterations=0 is invalid: set it to an integer >= 1"),
])
def test_bad_hyperparameters_are_refused_before_any_work(batch, method, hparams, message):
    model = linear()
    before = model[0].weight.detach().clone()
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(model, method, 0.5, [batch], **hparams)
    assert not get_masks(model) and torch.equal(model[0].weight, before)


def test_synflow_needs_data_only_to_train_and_a_shape_to_score(batch):
    with pytest.raises(PrunekitError, match="training the pruned network needs data"):
        prunekit.prune(linear(), "synflow", 0.5, epochs=1)
    with pytest.raises(PrunekitError, match="needs its shape"):
        prunekit.prune(linear(), "synflow", 0.5)
    assert prunekit.prune(linear(), "synflow", 0.5, [batch], iterations=2).sparsity == 0.5  # shape from the data
