"""Sparse linear layers: equal outputs, and the per-layer and end-to-end decisions, under a fake timer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.export.sparse_layers import (
    CSR_ADDMM,
    DENSE,
    SPARSE_KERNELS,
    SparseLinear,
    sparsify_linear_layers,
)


class FakeTimer:
    """Seconds from a table {what: {label: seconds}} (default 1.0); runs every candidate once, records the asks."""

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table, self.asked = table, []

    def __call__(self, what, candidates):
        self.asked.append((what, sorted(candidates)))
        for fn in candidates.values():
            fn()
        return {label: self.table.get(what, {}).get(label, 1.0) for label in candidates}


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32, bias=False), nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def sparse_three_layers(c_sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = ThreeLayers()
    for layer, sparsity in ((model.a, 0.9), (model.b, 0.95), (model.c, c_sparsity)):
        with torch.no_grad():
            layer.weight[torch.rand_like(layer.weight) < sparsity] = 0.0
    return model


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_computes_what_the_dense_layer_does(kernel, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.9] = 0.0
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.allclose(SparseLinear(linear, kernel)(x), linear(x), rtol=1e-5, atol=1e-6)


def test_layers_faster_sparse_are_switched_and_kept_when_the_model_is_faster_end_to_end():
    model = sparse_three_layers()
    x = torch.randn(8, 16)
    expected = model(x)
    timer = FakeTimer({"a": {DENSE: 2.0, CSR_ADDMM: 1.0}, "b": {DENSE: 1.0, CSR_ADDMM: 1.5},  # c: a tie, dense wins
                       "model": {DENSE: 2.0, "sparse": 1.5}})
    report = sparsify_linear_layers(model, x, timer=timer)
    assert report.kept and report.sparse_layers == ["a"]
    assert isinstance(model.a, SparseLinear) and model.a.kernel == CSR_ADDMM
    assert type(model.b) is nn.Linear
    assert report.speedup == pytest.approx(2.0 / 1.5)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_every_layer_goes_back_dense_when_the_model_is_not_faster_end_to_end():
    model = sparse_three_layers()
    timer = FakeTimer({"a": {DENSE: 2.0, CSR_ADDMM: 1.0}, "model": {DENSE: 1.0, "sparse": 1.01}})
    report = sparsify_linear_layers(model, torch.randn(8, 16), timer=timer)
    assert not report.kept and report.sparse_layers == [] and report.speedup == 1.0
    assert all(type(layer) is nn.Linear for layer in (model.a, model.b, model.c))
    assert "every layer stays dense" in str(report)


def test_with_no_layer_faster_sparse_the_model_is_only_timed_dense():
    model = sparse_three_layers()
    timer = FakeTimer({})  # every candidate 1.0: dense wins every tie
    report = sparsify_linear_layers(model, torch.randn(8, 16), timer=timer)
    assert timer.asked[-1] == ("model", [DENSE]) and report.sparse_seconds is None and not report.kept
    assert "no layer was faster sparse" in str(report)


def test_layers_below_the_minimum_sparsity_are_not_timed():
    timer = FakeTimer({})
    report = sparsify_linear_layers(sparse_three_layers(c_sparsity=0.2), torch.randn(8, 16), timer=timer)
    assert [layer.name for layer in report.layers] == ["a", "b"]
    assert ("c", sorted([DENSE, *SPARSE_KERNELS])) not in timer.asked


def test_a_model_with_masks_attached_is_refused_before_any_timing():
    model = sparse_three_layers()
    prunekit.prune(model, "magnitude", 0.5)
    timer = FakeTimer({})
    with pytest.raises(PrunekitError, match="make_permanent"):
        sparsify_linear_layers(model, torch.randn(8, 16), timer=timer)
    assert timer.asked == []


@pytest.mark.parametrize("threads, clock", [(1, "thread_time"), (2, "perf_counter")])
def test_one_thread_is_timed_on_its_cpu_clock_and_several_on_the_wall_clock(threads, clock):
    import time

    from prunekit.export.timing import default_clock

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert default_clock() is getattr(time, clock)
    finally:
        torch.set_num_threads(before)
