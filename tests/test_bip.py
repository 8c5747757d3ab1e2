import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.budgets import Budget
from prunekit.cost import CostMeter
from prunekit.data import Loader, TensorSplit
from prunekit.errors import PrunekitError
from prunekit.masks import STRAIGHT_THROUGH, attach_masks, get_masks
from prunekit.methods import PruneContext
from prunekit.methods import _scores as scores_module
from prunekit.methods._pruned_bn import RunningStatsForPrunedChannels
from prunekit.methods._scores import Scores, grad_at_masked_weight, straight_through
from prunekit.hparams import build
from prunekit.methods.bip import BilevelStep, BipHparams, upper_gradient
from prunekit.targets import find_targets
from prunekit.training import Callback, Trainer


class StopAfterFirstStep(Callback):
    def on_step_end(self, trainer, loss):
        trainer.stop()


def one_iteration(model, data, hp: BipHparams, sparsity: float, initial=None) -> Scores:
    """One BiP iteration (lower step on data[0], upper step on data[1]) through the method's own callback."""
    with CostMeter(model) as meter:
        ctx = PruneContext(model, find_targets(model)[0], sparsity, Budget(), data, 0, meter)
        scores = Scores(ctx, initial or {t.name: t.dense for t in ctx.targets})
        scores.project()
        Trainer(model, data, hp.training, callbacks=[BilevelStep(ctx, scores, hp), StopAfterFirstStep()],
                progress=False).fit()
    return scores


def test_top_k_keeps_exactly_k_and_passes_the_mask_gradient_straight_to_the_scores(tiny_net, tiny_batches):
    reference_net = copy.deepcopy(tiny_net)
    with CostMeter(tiny_net) as meter:
        ctx = PruneContext(tiny_net, find_targets(tiny_net)[0], 0.7, Budget(), tiny_batches, 0, meter)
        generator = torch.Generator().manual_seed(3)
        scores = Scores(ctx, {t.name: torch.randn(t.shape, generator=generator) for t in ctx.targets})
        scores.project()
    names = [t.name for t in ctx.targets]
    kept = torch.cat([scores.masks[n].flatten() for n in names])
    magnitudes = torch.cat([scores.tensors[n].detach().abs().flatten() for n in names])
    assert int(kept.sum()) == kept.numel() - round(0.7 * kept.numel())
    assert magnitudes[kept].min() > magnitudes[~kept].max()  # one global ranking of |s|

    inputs, labels = tiny_batches[0]
    F.cross_entropy(tiny_net(inputs), labels).backward()
    # Reference: autograd through z = θ ⊙ (m + |s| - stop_gradient(|s|)), which is θ ⊙ m going forward.
    leaves = {n: scores.tensors[n].detach().clone().requires_grad_(True) for n in names}
    weights = {n: reference_net.get_parameter(n) * (scores.masks[n] + leaves[n].abs() - leaves[n].abs().detach())
               for n in names}
    F.cross_entropy(torch.func.functional_call(reference_net, weights, (inputs,)), labels).backward()
    pruned_scores_learning = 0
    for target in ctx.targets:
        assert torch.equal(target.weight, target.dense * scores.masks[target.name])
        ours = straight_through(scores.tensors[target.name], target.dense.detach() * grad_at_masked_weight(target))
        assert torch.allclose(ours, leaves[target.name].grad, atol=1e-7)
        pruned_scores_learning += int((ours[~scores.masks[target.name]] != 0).sum())
    assert pruned_scores_learning > 0  # scores of pruned weights get a gradient too, so they can come back


def test_one_iteration_moves_kept_weights_only_and_every_score(tiny_net, tiny_batches):
    # Strong weight decay and momentum would move pruned weights if the step did not leave them alone.
    hp = build(BipHparams, {"epochs": 1, "weight_decay": 0.05, "momentum": 0.9}, "bip")
    weights_before = {t.name: t.dense.detach().clone() for t in find_targets(tiny_net)[0]}
    bn_before = tiny_net.bn.weight.detach().clone()
    masks = prunekit.prune(copy.deepcopy(tiny_net), "magnitude", 0.6).masks  # scores = weights: the first mask
    scores = one_iteration(tiny_net, tiny_batches, hp, sparsity=0.6)
    for target in find_targets(tiny_net)[0]:
        before, kept = weights_before[target.name], masks[target.name]
        moved = target.dense != before
        assert not moved[~kept].any()
        assert moved[kept].all()
        assert (scores.tensors[target.name].detach() != before).all()  # scores started as the weights
    assert not torch.equal(tiny_net.bn.weight, bn_before)  # BatchNorm belongs to the lower level


def test_upper_gradient_variants_by_hand():
    score = torch.tensor([-2.0, 1.0, 0.5])
    weight = torch.tensor([3.0, -1.0, 2.0])
    mask = torch.tensor([True, True, False])
    grad_z = torch.tensor([0.5, 2.0, -1.0])
    # ∂ℓ/∂m = θ ⊙ ∂ℓ/∂z = [1.5, -2, -2]; sign(s) = [-1, 1, 1]
    off = upper_gradient(score, weight, mask, grad_z, "off", 0.1)
    paper = upper_gradient(score, weight, mask, grad_z, "paper", 0.1)  # IG_m = -0.1 · ∂ℓ/∂z ⊙ m ⊙ ∂ℓ/∂z
    code = upper_gradient(score, weight, mask, grad_z, "code", 0.1)    # IG = -0.1 · (∂ℓ/∂s)²
    assert off.tolist() == pytest.approx([-1.5, -2.0, -2.0])
    assert paper.tolist() == pytest.approx([-1.475, -2.4, -2.0])
    assert code.tolist() == pytest.approx([-1.725, -2.4, -2.4])


@pytest.mark.parametrize("variant", ["off", "paper", "code"])
def test_implicit_gradient_variants_on_a_linear_model_with_gradients_by_hand(variant):
    generator = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, generator=generator), torch.tensor([0, 1, 1, 0])) for _ in range(2)]
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [-0.3, 0.8, 2.0]]))
    w0 = model.weight.detach().clone()
    lr, score_lr, scale = 0.5, 0.5, 10.0
    hp = build(BipHparams, dict(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, lr_schedule="constant",
                                score_lr=score_lr, score_lr_schedule="constant", score_weight_decay=0.0,
                                implicit_gradient=variant, ig_scale=scale), "bip")
    scores = one_iteration(model, data, hp, sparsity=0.5)

    def grad_z(weights, batch):  # cross-entropy of a linear model: (softmax(x zᵀ) - onehot(y))ᵀ x / B
        inputs, labels = batch
        probabilities = torch.softmax(inputs @ weights.T, dim=1)
        return (probabilities - F.one_hot(labels, 2)).T @ inputs / len(labels)

    m = (w0.abs() >= w0.abs().flatten().sort().values[3])  # the top 3 of 6 by |s| = |w0|
    w1 = w0 - lr * m * grad_z(m * w0, data[0])            # lower level on the first batch
    g = grad_z(m * w1, data[1])                            # upper level on the other batch, at θ_{t+1}
    sign = w0.sign()
    expected = {"off": w0 - score_lr * sign * w1 * g,
                "paper": w0 - score_lr * sign * (w1 * g - scale * m * g * g),
                "code": w0 - score_lr * (sign * w1 * g - scale * (w1 * g) ** 2)}[variant]
    assert torch.allclose(scores.tensors["weight"].detach(), expected, atol=1e-6)
    assert torch.allclose(model.parametrizations.weight.original.detach(), w1, atol=1e-6)


def synthetic_loader(batches: int = 4, batch_size: int = 16, seed: int = 0) -> Loader:
    generator = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 4, (batches * batch_size,), generator=generator)
    # Each class lights up its own quadrant, so the task is learnable by the tiny net.
    images = torch.randint(0, 60, (len(labels), 3, 6, 6), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[index, :, 3 * row:3 * row + 3, 3 * col:3 * col + 3] += 150
    return Loader(TensorSplit(images, labels), batch_size, shuffle=True, seed=seed)


def test_same_seed_same_masks_and_weights_and_each_epoch_recorded(tiny_net):
    twin = copy.deepcopy(tiny_net)
    first = prunekit.prune(tiny_net, "bip", 0.8, synthetic_loader(), epochs=3, seed=4)
    second = prunekit.prune(twin, "bip", 0.8, synthetic_loader(), epochs=3, seed=4)
    assert all(torch.equal(first.masks[n], second.masks[n]) for n in first.masks)
    twin_state = twin.state_dict()
    assert all(torch.equal(value, twin_state[key]) for key, value in tiny_net.state_dict().items())
    assert [e["epoch"] for e in first.history] == [1, 2, 3]
    assert all(e["phase"] == "bilevel" and "mask_flips" in e for e in first.history)
    forward = [e["cost"]["forward_examples"] for e in first.history]
    assert forward == [2 * 64, 4 * 64, 6 * 64]  # two passes per epoch: one per level
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]


def test_each_iteration_writes_the_new_mask_into_the_attached_one_without_walking_the_model(tiny_net, monkeypatch):
    attached = []
    attach = scores_module.attach_masks
    monkeypatch.setattr(scores_module, "attach_masks", lambda *args: attached.append(args) or attach(*args))
    seen = []
    result = prunekit.prune(tiny_net, "bip", 0.8, synthetic_loader(), epochs=2, score_lr=1.0,
                            observer=lambda model, event: seen.append(get_masks(model)))
    assert len(attached) == 1  # the first projection; the 2 × 8 that follow copy into its mask buffers
    assert all(torch.equal(seen[-1][n], result.masks[n]) for n in result.masks)
    assert sum(event["mask_flips"] for event in result.history) > 0  # the model saw masks that changed


def test_finetune_trains_kept_weights_under_the_final_mask(tiny_net):
    after_bilevel = {}

    def snapshot(model, event):
        if event["phase"] == "bilevel":
            after_bilevel.update({t.name: t.dense.detach().clone() for t in find_targets(model)[0]})

    result = prunekit.prune(tiny_net, "bip", 0.7, synthetic_loader(), epochs=1, finetune_epochs=2, observer=snapshot)
    assert [e["phase"] for e in result.history] == ["bilevel", "finetune", "finetune"]
    for target in find_targets(tiny_net)[0]:
        mask = result.masks[target.name]
        assert torch.equal(target.dense != 0, mask)  # pruned weights are exactly zero, kept ones are not
        assert (target.dense[mask] != after_bilevel[target.name][mask]).all()  # fine-tuning moved every kept one


def test_mask_flips_count_the_entries_each_epoch_changed(tiny_net):
    previous = prunekit.prune(copy.deepcopy(tiny_net), "magnitude", 0.8).masks  # the scores start as the weights
    seen = []
    result = prunekit.prune(tiny_net, "bip", 0.8, synthetic_loader(), epochs=2, score_lr=1.0,
                            observer=lambda model, event: seen.append(get_masks(model)))
    for event, masks in zip(result.history, seen, strict=True):
        assert event["mask_flips"] == sum(int((masks[n] != previous[n]).sum()) for n in masks)
        previous = masks
    assert sum(event["mask_flips"] for event in result.history) > 0


def test_structured_scores_rank_groups_by_their_l2_norm():
    model = nn.Sequential(nn.Conv2d(2, 2, (1, 2), bias=False))
    filters = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]],      # L1 3, L2 3
                            [[[1.2, 1.2]], [[1.2, 1.2]]]])     # L1 4.8, L2 2.4
    channels = torch.tensor([[[[3.0, 0.0]], [[2.0, 2.0]]],     # channel 0: L2 3.16; channel 1: L1 4, L2 2.83
                             [[[1.0, 0.0]], [[0.0, 0.0]]]])
    for structure, initial, keep in (("filters", filters, (slice(0, 1), slice(None))),
                                     ("channels", channels, (slice(None), slice(0, 1)))):
        with CostMeter(model) as meter:
            ctx = PruneContext(model, find_targets(model)[0], 0.5, Budget("uniform", structure), None, 0, meter)
            scores = Scores(ctx, {"0.weight": initial})
            scores.project()
        expected = torch.zeros(2, 2, 1, 2, dtype=torch.bool)
        expected[keep] = True
        assert torch.equal(scores.masks["0.weight"], expected), structure


def test_filter_wise_bip_masks_whole_filters(tiny_net):
    result = prunekit.prune(tiny_net, "bip", 0.5, synthetic_loader(), structure="filters", budget="uniform",
                            epochs=2)
    for name, mask in result.masks.items():
        per_filter = mask.flatten(1)
        assert torch.equal(per_filter.all(1), per_filter.any(1)), name
        assert int((~per_filter.any(1)).sum()) == round(0.5 * mask.shape[0])


@pytest.mark.parametrize("hparams, message", [
    ({"implicit_gradient": "both"}, r"implicit_gradient='both' is invalid: set it to one of paper, code, off"),
    ({"ig_scale": 0.0}, r"ig_scale=0.0 is invalid.*implicit_gradient=off"),
    ({"score_lr": -1.0}, r"score_lr=-1.0 is invalid: set it to a finite number > 0"),
    ({"score_lr_schedule": "linear"}, r"score_lr_schedule='linear' is invalid"),
    ({"score_weight_decay": float("nan")}, r"score_weight_decay=nan is invalid"),
    ({"finetune_epochs": -1}, r"finetune_epochs=-1 is invalid: set it to an integer >= 0"),
    ({"epochs": 0}, r"epochs=0 is invalid"),
    ({"pruned_channel_bn": "eval"}, r"pruned_channel_bn='eval' is invalid: set it to one of batch, running"),
])
def test_bad_hyperparameters_fail_before_any_work(tiny_net, tiny_batches, hparams, message):
    before = copy.deepcopy(tiny_net.state_dict())
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(tiny_net, "bip", 0.5, tiny_batches, **hparams)
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())


def test_bip_needs_two_batches_per_iteration(tiny_net, tiny_batches):
    with pytest.raises(PrunekitError, match="needs data"):
        prunekit.prune(tiny_net, "bip", 0.5)
    with pytest.raises(PrunekitError, match="two different mini-batches.*1 batch"):
        prunekit.prune(tiny_net, "bip", 0.5, tiny_batches[:1])
    assert not any("parametrizations" in name for name, _ in tiny_net.named_parameters())


def conv_bn_with_a_pruned_filter():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.4, 0.2, 0.3]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.8, 2.0, 0.5]))
        model[1].weight.copy_(torch.tensor([1.0, 0.7, 1.2, 0.9]))
        model[1].bias.copy_(torch.tensor([0.1, 0.6, -0.1, 0.2]))
    targets = find_targets(model)[0]
    masks = {t.name: torch.ones(t.shape, dtype=torch.bool) for t in targets}
    masks["0.weight"][1] = False  # filter 1 removed
    return model, targets, masks


def test_pruned_channel_is_normalised_with_its_running_statistics_which_stay_as_they_were():
    model, targets, masks = conv_bn_with_a_pruned_filter()
    attach_masks(model, masks, STRAIGHT_THROUGH)
    plain = copy.deepcopy(model)
    inputs = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    norm, stats_before = model[1], (model[1].running_mean.clone(), model[1].running_var.clone())
    model.train(), plain.train()
    with RunningStatsForPrunedChannels(model, targets, lambda: masks):
        model(inputs)  # the first forward pass pairs the convolution with its batch norm
        ours = model[:2](inputs)
    plain(inputs)
    reference = plain[:2](inputs)
    kept = [0, 2, 3]
    assert torch.allclose(ours[:, kept], reference[:, kept])  # kept channels: the batch's statistics
    expected = 0.6 - 0.7 * -0.4 / (0.8 + norm.eps) ** 0.5   # a zero input normalised with the running ones
    assert torch.allclose(ours[:, 1], torch.full_like(ours[:, 1], expected))
    assert reference[:, 1].eq(0.6).all()  # without: mean 0, variance 0, the output is β
    assert norm.running_mean[1] == stats_before[0][1] and norm.running_var[1] == stats_before[1][1]
    assert torch.allclose(norm.running_mean[kept], plain[1].running_mean[kept])
    assert not model._forward_hooks and not norm._forward_hooks and not norm._forward_pre_hooks


def test_running_statistics_put_the_pruned_filters_gradient_on_the_kept_filters_scale():
    def filter_gradients(remedy: bool) -> torch.Tensor:
        model, targets, masks = conv_bn_with_a_pruned_filter()
        attach_masks(model, masks, STRAIGHT_THROUGH)
        generator = torch.Generator().manual_seed(4)
        inputs, labels = torch.randn(16, 3, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        with RunningStatsForPrunedChannels(model, targets, lambda: masks) if remedy else contextlib.nullcontext():
            model.train()
            model(inputs)
            F.cross_entropy(model(inputs), labels).backward()
        return targets[0].dense.grad.flatten(1).norm(dim=1)

    without, running = filter_gradients(False), filter_gradients(True)
    assert without[1] > 50 * without[[0, 2, 3]].max()  # γ/√eps: hundreds of times the kept filters'
    assert 0 < running[1] < 5 * running[[0, 2, 3]].max()


def test_filter_wise_bip_with_running_statistics_runs_and_is_refused_for_other_structures(tiny_net):
    result = prunekit.prune(copy.deepcopy(tiny_net), "bip", 0.5, synthetic_loader(), structure="filters",
                            budget="uniform", epochs=1, pruned_channel_bn="running")
    rows = result.masks["conv.weight"].flatten(1)
    assert (rows.all(dim=1) | ~rows.any(dim=1)).all() and int((~rows.any(dim=1)).sum()) == 4
    with pytest.raises(PrunekitError, match="pruned_channel_bn='running' is for whole pruned filters"):
        prunekit.prune(tiny_net, "bip", 0.5, synthetic_loader(), pruned_channel_bn="running")
    assert not get_masks(tiny_net)
