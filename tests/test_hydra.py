import copy
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.methods.hydra import scaled_scores
from prunekit.targets import find_targets

from test_bip import synthetic_loader


def test_score_phase_leaves_every_parameter_alone_and_learns_the_mask(tiny_net):
    before = copy.deepcopy(tiny_net.state_dict())
    magnitude = prunekit.prune(copy.deepcopy(tiny_net), "magnitude", 0.7).masks
    result = prunekit.prune(tiny_net, "hydra", 0.7, synthetic_loader(), epochs=3, finetune_epochs=0, lr=0.5)
    assert [e["phase"] for e in result.history] == ["scores"] * 3
    for name, value in tiny_net.state_dict().items():
        if "running" in name or "num_batches" in name or name.endswith(".mask"):
            continue  # BatchNorm statistics follow the masked network; the masks are the result
        original = name.replace(".parametrizations.weight.original", ".weight")
        expected = before[original] * result.masks[original] if original in result.masks else before[original]
        assert torch.equal(value, expected), name  # prune() zeroes pruned weights; nothing else moved
    assert sum(e["mask_flips"] for e in result.history) > 0
    assert any(not torch.equal(result.masks[n], magnitude[n]) for n in magnitude)
    total = sum(mask.numel() for mask in result.masks.values())  # a learned mask, an exact count all the same
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.7 * total)


def test_fine_tuning_trains_the_kept_weights_under_the_learned_mask(tiny_net):
    before = {t.name: t.dense.detach().clone() for t in find_targets(tiny_net)[0]}
    result = prunekit.prune(tiny_net, "hydra", 0.7, synthetic_loader(), epochs=1, finetune_epochs=2)
    assert [e["phase"] for e in result.history] == ["scores", "finetune", "finetune"]
    for target in find_targets(tiny_net)[0]:
        mask = result.masks[target.name]
        assert torch.equal(target.dense != 0, mask)
        assert (target.dense[mask] != before[target.name][mask]).all()


def test_scores_start_proportional_to_the_weights_at_kaiming_scale():
    layer = nn.Conv2d(4, 3, 3)
    target = find_targets(nn.Sequential(layer))[0][0]
    scores = scaled_scores(target)
    bound = math.sqrt(6 / (4 * 9))  # Kaiming-uniform bound for fan_in = 4·3·3
    assert scores.abs().max().item() == pytest.approx(bound)
    assert torch.allclose(scores, layer.weight.detach() * (bound / layer.weight.detach().abs().max()))


def test_bad_input_fails_before_any_work(tiny_net, tiny_batches):
    with pytest.raises(PrunekitError, match=r"finetune_epochs=-1 is invalid: set it to an integer >= 0"):
        prunekit.prune(tiny_net, "hydra", 0.5, tiny_batches, finetune_epochs=-1)
    with pytest.raises(PrunekitError, match="needs data"):
        prunekit.prune(tiny_net, "hydra", 0.5)
    with torch.no_grad():
        tiny_net.fc.weight.zero_()
    with pytest.raises(PrunekitError, match="fc.weight is all zeros; leave it out with --exclude"):
        prunekit.prune(tiny_net, "hydra", 0.5, tiny_batches)
    assert not any("parametrizations" in name for name, _ in tiny_net.named_parameters())
