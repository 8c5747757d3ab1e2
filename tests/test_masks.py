import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.masks import (MASKED, STRAIGHT_THROUGH, attach_masks, get_masks, read_masks,
                            set_gradient_mode)


def random_masks(model, sparsity=0.6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=generator) >= sparsity
            for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}


def test_masked_mode_blocks_gradient_straight_through_passes_it(tiny_net, tiny_batches):
    masks = random_masks(tiny_net)
    straight = copy.deepcopy(tiny_net)
    attach_masks(tiny_net, masks, MASKED)
    attach_masks(straight, masks, STRAIGHT_THROUGH)
    x, y = tiny_batches[0]
    for model in (tiny_net, straight):
        nn.functional.cross_entropy(model(x), y).backward()
    for name, mask in masks.items():
        module = tiny_net.get_submodule(name.rsplit(".", 1)[0])
        twin = straight.get_submodule(name.rsplit(".", 1)[0])
        masked_grad = module.parametrizations.weight.original.grad
        straight_grad = twin.parametrizations.weight.original.grad
        assert (masked_grad[~mask] == 0).all()
        assert straight_grad[~mask].abs().sum() > 0  # pruned weights still learn
        # at kept positions both modes see the gradient taken at the masked weights
        torch.testing.assert_close(masked_grad[mask], straight_grad[mask])


def test_straight_through_gradient_equals_gradient_at_masked_weights(tiny_net, tiny_batches):
    masks = random_masks(tiny_net)
    reference = copy.deepcopy(tiny_net)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    attach_masks(tiny_net, masks, STRAIGHT_THROUGH)
    x, y = tiny_batches[0]
    nn.functional.cross_entropy(tiny_net(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for name in masks:
        module = tiny_net.get_submodule(name.rsplit(".", 1)[0])
        torch.testing.assert_close(module.parametrizations.weight.original.grad, reference.get_parameter(name).grad)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero_through_training(tiny_net, tiny_batches, optimizer):
    result = prunekit.prune(tiny_net, "magnitude", 0.7)
    params = tiny_net.parameters()
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=0.01, weight_decay=0.01))
    for _ in range(5):
        for x, y in tiny_batches:
            opt.zero_grad()
            nn.functional.cross_entropy(tiny_net(x), y).backward()
            opt.step()
    for name, mask in result.masks.items():
        module = tiny_net.get_submodule(name.rsplit(".", 1)[0])
        assert (module.weight[~mask] == 0).all()
        assert (module.parametrizations.weight.original[~mask] == 0).all()
    assert prunekit.sparsity_report(tiny_net).zeros >= sum(int((~m).sum()) for m in result.masks.values())


def test_make_permanent_leaves_plain_modules_with_equal_outputs(tiny_net, tiny_batches):
    prunekit.prune(tiny_net, "magnitude", 0.8, budget="uniform")
    tiny_net.eval()
    x = tiny_batches[0][0]
    before = tiny_net(x)
    prunekit.make_permanent(tiny_net)
    assert not any("parametrizations" in name for name, _ in tiny_net.named_parameters())
    assert isinstance(tiny_net.conv.weight, nn.Parameter)
    torch.testing.assert_close(tiny_net(x), before, rtol=0, atol=0)
    assert prunekit.sparsity_report(tiny_net).sparsity == pytest.approx(0.8, abs=0.01)


def pruned_weight_gradients(model, masks, batch):
    """The gradient of the dense weights at the pruned positions, after one backward pass."""
    model.zero_grad()
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight.original.grad[~mask]
            for name, mask in masks.items()}


def test_set_gradient_mode_switches_what_reaches_pruned_weights(tiny_net, tiny_batches):
    masks = prunekit.prune(tiny_net, "magnitude", 0.5).masks
    assert all((grad == 0).all() for grad in pruned_weight_gradients(tiny_net, masks, tiny_batches[0]).values())
    set_gradient_mode(tiny_net, STRAIGHT_THROUGH)
    assert all(grad.abs().sum() > 0 for grad in pruned_weight_gradients(tiny_net, masks, tiny_batches[0]).values())
    set_gradient_mode(tiny_net, MASKED)
    assert all((grad == 0).all() for grad in pruned_weight_gradients(tiny_net, masks, tiny_batches[0]).values())
    with pytest.raises(PrunekitError, match="gradient mode"):
        set_gradient_mode(tiny_net, "sideways")


def test_mask_file_round_trip_with_metadata(tiny_net, tmp_path):
    result = prunekit.prune(tiny_net, "random", 0.75, budget="uniform", seed=3)
    path = tmp_path / "masks.safetensors"
    # strings that look like JSON must come back as the strings they were
    lookalikes = {"run": "1", "flag": "true", "nothing": "null", "listing": "[2]", "text": "plain"}
    prunekit.save_masks(tiny_net, path, {**result.metadata(), **lookalikes})
    masks, metadata = read_masks(path)
    assert masks.keys() == result.masks.keys()
    assert all(torch.equal(masks[n], result.masks[n]) for n in masks)
    assert {key: metadata[key] for key in result.metadata()} == result.metadata()  # hparams and budget included
    assert metadata["budget"]["allocation"] == "uniform" and metadata["requested_sparsity"] == 0.75
    assert {key: metadata[key] for key in lookalikes} == lookalikes
    assert metadata["achieved_sparsity"] == pytest.approx(result.sparsity)
    assert metadata["prunekit_version"] == prunekit.__version__
    fresh = type(tiny_net)()
    prunekit.load_masks(fresh, path)
    assert all(torch.equal(get_masks(fresh)[n], masks[n]) for n in masks)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]  # no temp file left


def test_method_hyperparameters_round_trip_through_a_mask_file(tiny_net, tiny_batches, tmp_path):
    result = prunekit.prune(tiny_net, "synflow", 0.5, tiny_batches, iterations=2)
    prunekit.save_masks(tiny_net, tmp_path / "masks.safetensors", result.metadata())
    hparams = read_masks(tmp_path / "masks.safetensors")[1]["hparams"]
    assert hparams == json.loads(json.dumps(result.hparams))  # JSON has lists where the settings have tuples
    assert hparams["iterations"] == 2


def test_straight_through_masks_load_from_a_file_and_fold_into_plain_weights(tiny_net, tiny_batches, tmp_path):
    masks = random_masks(tiny_net)
    path = tmp_path / "masks.safetensors"
    prunekit.save_masks(masks, path)
    dense = {name: tiny_net.get_parameter(name).detach().clone() for name in masks}
    prunekit.load_masks(tiny_net, path, mode=STRAIGHT_THROUGH)
    for name, mask in masks.items():  # straight-through keeps the dense weights; the model computes with masked ones
        module = tiny_net.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(module.parametrizations.weight.original, dense[name])
        assert torch.equal(module.weight, dense[name] * mask)
    assert all(grad.abs().sum() > 0 for grad in pruned_weight_gradients(tiny_net, masks, tiny_batches[0]).values())
    tiny_net.eval()
    x = tiny_batches[0][0]
    before = tiny_net(x)
    prunekit.make_permanent(tiny_net)
    assert not any("parametrizations" in name for name, _ in tiny_net.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(tiny_net.get_parameter(name).detach(), dense[name] * mask)
    torch.testing.assert_close(tiny_net(x), before, rtol=0, atol=0)


def test_mask_file_for_another_model_is_refused_before_attaching(tiny_net, tmp_path):
    path = tmp_path / "other.safetensors"
    prunekit.save_masks({"conv.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool),
                         "fc.weight": torch.ones(5, 32, dtype=torch.bool)}, path)
    with pytest.raises(PrunekitError, match=r"fc.weight has shape \(5, 32\)"):
        prunekit.load_masks(tiny_net, path)
    assert get_masks(tiny_net) == {}  # nothing half-applied
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PrunekitError, match="not a prunekit mask file"):
        prunekit.load_masks(tiny_net, tmp_path / "plain.safetensors")


def test_unknown_tensor_names_are_listed(tiny_net):
    with pytest.raises(PrunekitError, match="another model"):
        attach_masks(tiny_net, {"encoder.weight": torch.ones(3, dtype=torch.bool)})


def test_save_refuses_unpruned_model(tiny_net, tmp_path):
    with pytest.raises(PrunekitError, match="no masks"):
        prunekit.save_masks(tiny_net, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("structure", ["unstructured", "filters"])
def test_every_supported_module_kind_prunes_and_folds(structure):
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "conv1d": nn.Conv1d(4, 6, 3),
        "conv3d": nn.Conv3d(2, 4, 3),
        "grouped": nn.Conv2d(4, 8, 3, groups=2),
        "depthwise": nn.Conv2d(4, 4, 3, groups=4),
        "linear": nn.Linear(5, 3),
    })
    inputs = {"conv1d": torch.randn(2, 4, 9), "conv3d": torch.randn(2, 2, 5, 5, 5), "grouped": torch.randn(2, 4, 6, 6),
              "depthwise": torch.randn(2, 4, 6, 6), "linear": torch.randn(2, 5)}
    result = prunekit.prune(model, sparsity=0.5, budget="uniform", structure=structure)
    assert len(result.layers) == 5
    outputs = {name: model[name](x) for name, x in inputs.items()}
    prunekit.make_permanent(model)
    for name, x in inputs.items():
        torch.testing.assert_close(model[name](x), outputs[name], rtol=0, atol=0)
    assert prunekit.sparsity_report(model).sparsity == pytest.approx(result.sparsity)
