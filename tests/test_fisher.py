import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.cost import CostMeter
from prunekit.errors import PrunekitError
from prunekit.fisher import (
    FisherHparams,
    WeightLayout,
    block_chunks,
    blocked_rows,
    tensor_groups,
    diagonal_fisher,
    fisher_examples,
    fitted_chunk,
    gradient_call_bytes,
    gradient_matrix,
    require_memory,
    saved_activation_bytes,
)
from prunekit.hparams import validate
from prunekit.masks import attach_masks
from prunekit.objectives import CrossEntropy, Distill, LossFunction
from prunekit.targets import find_targets


def autograd_rows(model, inputs, labels, batch=1):
    """The reference: one backward pass per gradient, plain autograd."""
    model.eval()
    targets, _ = find_targets(model)
    rows = []
    for start in range(0, len(inputs), batch):
        model.zero_grad()
        F.cross_entropy(model(inputs[start:start + batch]), labels[start:start + batch]).backward()
        rows.append(torch.cat([t.module.weight.grad.reshape(-1) for t in targets]))
    return torch.stack(rows)


def examples(tiny_batches):
    return torch.cat([x for x, _ in tiny_batches]), torch.cat([y for _, y in tiny_batches])


@pytest.mark.parametrize("batch", [1, 4])
def test_vectorised_gradients_equal_a_plain_autograd_loop(tiny_net, tiny_batches, batch):
    inputs, labels = examples(tiny_batches)
    tiny_net.train()  # BN must still use its running statistics, and the mode must come back
    running_mean = tiny_net.bn.running_mean.clone()
    g = gradient_matrix(tiny_net, find_targets(tiny_net)[0], (inputs, labels), batch=batch, chunk=8)
    assert tiny_net.training and torch.equal(tiny_net.bn.running_mean, running_mean)
    expected = autograd_rows(copy.deepcopy(tiny_net), inputs, labels, batch)
    assert g.rows.shape == (len(inputs) // batch, g.layout.p)
    torch.testing.assert_close(g.rows, expected, rtol=1e-4, atol=1e-6)


def test_gradient_sum(tiny_net, tiny_batches):
    inputs, labels = examples(tiny_batches)
    g = gradient_matrix(tiny_net, find_targets(tiny_net)[0], (inputs, labels), dtype=torch.float64)
    torch.testing.assert_close(g.gradient_sum(), g.rows.sum(0))


def test_distill_first_order_term_is_n_times_the_loss_gradient_at_the_scale_of_its_curvature_rows(tiny_net,
                                                                                                  tiny_batches):
    """Distill's rows are Jacobian projections, E[ggᵀ] = JᵀJ/D, half the MSE's Gauss-Newton Hessian 2JᵀJ/D; so
    the term beside them is half of n times the loss's mean gradient (0 at the dense model itself)."""
    inputs, _ = examples(tiny_batches)
    dense = copy.deepcopy(tiny_net).eval()
    objective = Distill(dense)
    targets = find_targets(tiny_net)[0]
    at_dense = gradient_matrix(tiny_net, targets, (inputs, None), objective, dtype=torch.float64)
    assert at_dense.gradient_sum().abs().max() < 1e-6
    with torch.no_grad():
        for target in targets:
            target.weight.mul_(torch.rand_like(target.weight) > 0.3)
    g = gradient_matrix(tiny_net, targets, (inputs, None), objective, batch=2, dtype=torch.float64)
    tiny_net.eval()
    loss = F.mse_loss(tiny_net(inputs), dense(inputs))
    expected = torch.cat([part.flatten() for part in torch.autograd.grad(loss, [t.weight for t in targets])])
    torch.testing.assert_close(g.gradient_sum(), 0.5 * (len(inputs) // 2) * expected.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g.gradient_sum(slice(3, 9)), g.gradient_sum()[3:9])


def test_masked_model_gives_the_gradient_at_the_pruned_weights_in_every_coordinate(tiny_net, tiny_batches):
    inputs, labels = examples(tiny_batches)
    targets, _ = find_targets(tiny_net)
    masks = {t.name: torch.rand(t.shape, generator=torch.Generator().manual_seed(3)) > 0.5 for t in targets}
    plain = copy.deepcopy(tiny_net)
    with torch.no_grad():  # the same function without parametrizations: weights already multiplied by the mask
        for t in find_targets(plain)[0]:
            t.dense.mul_(masks[t.name])
    attach_masks(tiny_net, masks)
    g = gradient_matrix(tiny_net, find_targets(tiny_net)[0], (inputs, labels))
    expected = autograd_rows(plain, inputs, labels)
    torch.testing.assert_close(g.rows, expected, rtol=1e-4, atol=1e-6)
    pruned = ~WeightLayout.of(targets).flatten(masks)
    assert g.rows[:, pruned].abs().sum() > 0  # pruned weights keep their gradient: CHITA++ may revive them


def test_diagonal_fisher_is_the_mean_squared_gradient(tiny_net, tiny_batches):
    inputs, labels = examples(tiny_batches)
    targets = find_targets(tiny_net)[0]
    rows = gradient_matrix(tiny_net, targets, (inputs, labels), dtype=torch.float64).rows
    torch.testing.assert_close(diagonal_fisher(tiny_net, targets, (inputs, labels), chunk=5),
                               rows.square().mean(0), rtol=1e-5, atol=1e-12)


def test_gradient_evaluations_are_counted(tiny_net, tiny_batches):
    inputs, labels = examples(tiny_batches)
    with CostMeter(tiny_net) as meter:
        gradient_matrix(tiny_net, find_targets(tiny_net)[0], (inputs, labels), batch=2, meter=meter)
    assert meter.cost.forward_examples == meter.cost.backward_examples == len(inputs)


def test_examples_are_the_first_ones_in_order(tiny_batches):
    inputs, labels = fisher_examples(tiny_batches, 20)
    torch.testing.assert_close(inputs, torch.cat([tiny_batches[0][0], tiny_batches[1][0][:4]]))
    assert torch.equal(labels, torch.cat([tiny_batches[0][1], tiny_batches[1][1][:4]]))  # each with its input
    with pytest.raises(PrunekitError, match="only 64.*fisher-samples"):
        fisher_examples(tiny_batches, 65)


def test_block_chunks_cut_a_tensor_into_equal_blocks_and_chunks_of_whole_blocks():
    chunks = list(block_chunks(slice(10, 226), 100, rows=8, chunk_bytes=10**9))  # 216 weights: 2 blocks of 108
    assert chunks == [(slice(10, 226), 108)]
    small = list(block_chunks(slice(0, 216), 100, rows=8, chunk_bytes=108 * 108 * 8))  # one block per chunk
    assert small == [(slice(0, 108), 108), (slice(108, 216), 108)]
    assert list(block_chunks(slice(0, 72), 100, rows=8, chunk_bytes=10**9)) == [(slice(0, 72), 72)]
    odd = list(block_chunks(slice(0, 250), 100, rows=8, chunk_bytes=125 * 125 * 8))
    assert odd == [(slice(0, 125), 125), (slice(125, 250), 125)]
    padded = blocked_rows(torch.ones(3, 250), 120)  # 250 weights in blocks of 120: the last padded
    assert padded.shape == (3, 3, 120) and padded[2, :, 10:].abs().sum() == 0 and padded.dtype == torch.float64


def test_the_gradient_chunk_shrinks_to_what_fits_beside_what_is_held():
    hp = FisherHparams(fisher_chunk=128, max_memory=1.0)
    per_example = gradient_call_bytes(hp, 1_000_000, chunk=1)  # float32 rows of p = 1M, and what is in flight
    assert fitted_chunk(hp, 1_000_000, 2**30 - 10 * per_example) == 10
    assert fitted_chunk(FisherHparams(fisher_chunk=128, max_memory=8.0), 1_000_000, 0) == 128  # never above it
    assert fitted_chunk(hp, 1_000_000, 2**30) == 1  # at least one: the planner then refuses, naming the rest


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_the_activations_counted_are_one_examples_feature_maps_and_never_the_weights():
    model = conv_net()
    targets = find_targets(model)[0]
    batch = (torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    one = saved_activation_bytes(model, targets, CrossEntropy(), batch)
    # the first example alone, not the batch whose view it is
    assert one == saved_activation_bytes(model, targets, CrossEntropy(), (batch[0][:1].clone(), batch[1][:1]))
    feature_maps = 4 * 64 * 16 * 16  # one float32 map of 64 channels
    assert 2 * feature_maps <= one <= 5 * feature_maps
    larger = saved_activation_bytes(model, targets, CrossEntropy(), (torch.randn(1, 3, 32, 32), batch[1][:1]))
    assert 3.8 * one <= larger <= 4.2 * one  # four times the pixels
    wide = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 10))
    hidden = saved_activation_bytes(wide, find_targets(wide)[0], CrossEntropy(), (torch.randn(1, 8), torch.tensor([0])))
    assert 4 * 4096 <= hidden < 8 * 4096  # the hidden layer's output, once; its 0.3 MB of weights not at all


def test_tensor_groups_pack_consecutive_tensors_within_the_budget():
    targets = [SimpleNamespace(numel=size) for size in (40, 50, 30, 200, 10)]
    assert tensor_groups(targets, column_bytes=2, budget=200) == [[0, 1], [2], [3], [4]]
    assert tensor_groups(targets, column_bytes=2, budget=10**6) == [[0, 1, 2, 3, 4]]


def test_layout_round_trip(tiny_net):
    targets = find_targets(tiny_net)[0]
    layout = WeightLayout.of(targets)
    vector = torch.arange(layout.p, dtype=torch.float32)
    layout.write(targets, vector)
    assert torch.equal(layout.flatten({t.name: t.weight for t in targets}), vector)


def test_memory_estimate_refuses_naming_the_knobs():
    hp = FisherHparams(max_memory=0.5)
    with pytest.raises(PrunekitError, match=r"about 1\.00 GiB, above --max-memory 0\.5 \(G 1\.00\); lower --fisher-samples"):
        require_memory("chita", {"G": 2**30}, hp, "--fisher-samples")
    require_memory("chita", {"G": 2**28}, hp, "--fisher-samples")


@pytest.mark.parametrize("field, value", [("fisher_samples", 0), ("fisher_batch", -1), ("fisher_chunk", 0),
                                          ("max_memory", 0.0)])
def test_bad_fisher_settings_are_refused(field, value):
    with pytest.raises(PrunekitError, match=rf"{field}={value} is invalid"):
        validate(FisherHparams(**{field: value}))


class DataDependent(nn.Module):
    """A branch on a value (Python control flow): vmap cannot batch it, one row at a time can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * (1.0 if float(x.sum()) > 0 else 2.0)


def test_rows_vmap_cannot_batch_fall_back_to_a_loop_with_the_same_values():
    torch.manual_seed(0)
    model, inputs, labels = DataDependent(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    g = gradient_matrix(model, find_targets(model)[0], (inputs, labels), dtype=torch.float64, chunk=4)
    assert g.route == "loop"
    expected = autograd_rows(copy.deepcopy(model), inputs, labels, 1)
    torch.testing.assert_close(g.rows, expected.to(torch.float64), rtol=1e-5, atol=1e-7)
    batched = gradient_matrix(nn.Sequential(model.fc), find_targets(nn.Sequential(model.fc))[0], (inputs, labels))
    assert batched.route == "vmap"


class Dictionary(nn.Module):
    """A model called as model(**batch), as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, features, scale):
        return self.fc(features) * scale


def test_rows_of_mapping_batches_under_any_objective_equal_a_plain_autograd_loop():
    torch.manual_seed(0)
    model = Dictionary()
    examples = {"features": torch.randn(6, 4), "scale": torch.rand(6, 1) + 0.5, "labels": torch.randint(0, 3, (6,))}
    objective = LossFunction(lambda m, b: (m(features=b["features"], scale=b["scale"]) ** 2).mean())
    g = gradient_matrix(model, find_targets(model)[0], examples, objective, batch=2)
    assert g.route == "vmap" and g.rows.shape == (3, 12)
    for row in range(3):
        part = {key: value[2 * row:2 * row + 2] for key, value in examples.items()}
        model.zero_grad()
        objective.loss(model, part)[0].backward()
        torch.testing.assert_close(g.rows[row], model.fc.weight.grad.reshape(-1), rtol=1e-5, atol=1e-7)
    assert fisher_examples([examples, examples], 8)["features"].shape == (8, 4)
