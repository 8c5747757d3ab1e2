"""What find_targets picks, without transformers: duck-typed Conv1D layouts, tied parameters, norms by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.targets import IN_OUT, OUT_IN, find_targets


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it: y = x @ W + b, W stored in × out."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))


class Tied(nn.Module):
    """Two linear layers sharing one weight, and an embedding whose table a third layer reads."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight
        self.conv1d = Conv1D(nf=6, nx=4)
        self.norm = RMSNorm(6)


def test_conv1d_is_recognised_by_its_name_and_in_out_weight():
    torch.manual_seed(0)
    targets, _ = find_targets(Tied())
    layouts = {t.name: t.layout for t in targets}
    assert layouts == {"conv1d.weight": IN_OUT}
    wrong = Conv1D(nf=4, nx=6)
    wrong.nf = 5  # a Conv1D whose weight does not hold nf outputs is not the layout prunekit knows
    with pytest.raises(prunekit.PrunekitError, match="no prunable tensors"):
        find_targets(nn.Sequential(wrong))
    assert find_targets(nn.Linear(3, 2))[0][0].layout == OUT_IN


def test_shared_and_embedding_tied_weights_are_left_dense_with_their_reasons():
    torch.manual_seed(0)
    _, skipped = find_targets(Tied())
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["embed.weight"] == "embedding"
    assert reasons["head.weight"] == "tied to embed.weight"
    assert reasons["first.weight"] == "shared with second.weight"
    assert reasons["second.weight"] == "tied to first.weight"
    assert reasons["norm.weight"] == "normalisation parameters are not pruned"


def test_include_prunes_a_shared_weight_once_and_both_layers_compute_with_it():
    torch.manual_seed(0)
    model = Tied()
    result = prunekit.prune(model, "magnitude", 0.5, include=[r"^second\.", r"^conv1d\."])
    assert set(result.masks) == {"second.weight", "conv1d.weight"}
    assert int((~result.masks["second.weight"]).sum()) + int((~result.masks["conv1d.weight"]).sum()) == 20
    assert torch.equal(model.first.weight, model.second.weight)  # zeroed where pruned, seen by both
    assert {s.name: s.reason for s in result.skipped}["first.weight"] == "tied to second.weight"
