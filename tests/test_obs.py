import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.methods import get_method
from prunekit.methods.obs import block_inverses


def sherman_morrison(rows, dampening):
    """WoodFisher's recursion: one rank-1 Woodbury update of λ⁻¹I per gradient."""
    n, size = rows.shape
    inverse = torch.eye(size, dtype=torch.float64) / dampening
    for g in rows.to(torch.float64):
        projected = inverse @ g
        inverse = inverse - torch.outer(projected, projected) / (n + g @ projected)
    return inverse


@pytest.mark.parametrize("n, size", [(20, 8), (8, 20)])  # block narrower and wider than n
def test_block_inverse_equals_the_direct_inverse_and_the_rank_one_updates(n, size):
    rows = torch.randn(n, size, generator=torch.Generator().manual_seed(0))
    direct = torch.linalg.inv(rows.double().T @ rows.double() / n + 0.1 * torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(block_inverses(rows, 0.1), direct)
    torch.testing.assert_close(sherman_morrison(rows, 0.1), direct)
    batched = block_inverses(torch.stack([rows, 2 * rows]), 0.1)  # blocks at once: each its own inverse
    torch.testing.assert_close(batched[0], direct)
    torch.testing.assert_close(batched[1], block_inverses(2 * rows, 0.1))


def linear_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 6, generator=generator))
    data = [(torch.randn(10, 6, generator=generator), torch.randint(0, 3, (10,), generator=generator))
            for _ in range(2)]
    return model, data


def per_example_gradients(model, data):
    rows = []
    for x, y in data:
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            rows.append(model.weight.grad.reshape(-1).clone())
    return torch.stack(rows).double()


def test_woodfisher_removes_the_lowest_obs_saliency_and_applies_the_obs_update():
    model, data = linear_problem()
    w = model.weight.detach().reshape(-1).double().clone()
    rows = per_example_gradients(model, data)
    inverse = torch.linalg.inv(rows.T @ rows / len(rows) + 1e-3 * torch.eye(18, dtype=torch.float64))
    q = int(torch.argmin(w.square() / (2 * inverse.diagonal())))
    expected = w - w[q] / inverse[q, q] * inverse[:, q]
    expected[q] = 0
    result = prunekit.prune(model, "woodfisher", 1 / 18, data, fisher_samples=20, dampening=1e-3, steps=1)
    assert not result.masks["weight"].reshape(-1)[q]
    torch.testing.assert_close(model.weight.detach().reshape(-1).double(), expected, rtol=1e-4, atol=1e-6)


def test_woodfisher_steps_only_remove_more(tiny_net, tiny_batches):
    result = prunekit.prune(tiny_net, "woodfisher", 0.75, tiny_batches * 3, fisher_samples=32, steps=3,
                            block_size=64)
    steps = [event for event in result.history if "step" in event]
    assert [event["scheduled"] for event in steps] == pytest.approx([0.25, 0.5, 0.75])
    total = sum(m.numel() for m in result.masks.values())
    pruned = [round(s * total) for s in (0.25, 0.5, 0.75)]
    assert [event["sparsity"] * total for event in steps] == pytest.approx(pruned)
    assert [event["pruned"] for event in steps] == [round(s * total) - round(r * total) for s, r in
                                                      ((0.25, 0), (0.5, 0.25), (0.75, 0.5))]
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.75 * total)
    assert result.cost.backward_examples == 3 * 32


def test_obd_scores_half_the_fisher_diagonal_times_the_squared_weight_and_keeps_the_weights():
    model, data = linear_problem(1)
    w = model.weight.detach().clone()
    diagonal = per_example_gradients(model, data).square().mean(0).reshape(3, 6)
    saliency = 0.5 * diagonal * w.double().square()
    result = prunekit.prune(model, "obd", 0.5, data, fisher_samples=20)
    kept = result.masks["weight"]
    assert saliency[kept].min() >= saliency[~kept].max()
    assert torch.equal(model.weight.detach()[kept], w[kept])
    assert "not updated" in get_method("obd").summary


@pytest.mark.parametrize("method, hparams, message", [
    ("woodfisher", {"dampening": 0.0}, r"dampening=0.0 is invalid: set it to a finite number > 0"),
    ("woodfisher", {"steps": 0}, r"steps=0 is invalid: set it to an integer >= 1"),
    ("woodfisher", {"max_memory": 1e-6}, r"woodfisher .* above --max-memory 1e-06 \(.*\); lower --fisher-samples"),
    ("obd", {"fisher_samples": 0}, r"fisher_samples=0 is invalid: set it to an integer >= 1"),
])
def test_bad_inputs_are_refused(tiny_net, method, hparams, message):
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(tiny_net, method, 0.5, Unreadable(), **hparams)


class Unreadable:
    def __iter__(self):
        raise AssertionError("the data was read before the inputs were checked")
