"""Sparse linear layers for inference, used only where measured faster on the machine at hand.

torch's CSR matrix product beats a dense one only at high sparsity and depending on shape, batch and thread
count (`benchmarks/RESULTS.md`): a layer is switched to CSR only when a short measurement on its own input
says so, and the switched model is kept only when it is faster end to end than the dense one (otherwise every
layer goes back). Unstructured masks make no layer smaller, so this and sparse files are what they can gain.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import PrunekitError
from ..masks import get_masks
from ..objectives import Batch, call_model
from ..tables import render_table
from .timing import Timer, measure

DENSE = "dense"
CSR_ADDMM = "csr"  # (W xᵀ)ᵀ + b with torch.addmm: the CSR matrix on the left, as torch's CPU kernel wants it
CSR_LINEAR = "csr-linear"  # F.linear with the CSR weight: a different kernel, faster for some shapes at batch 1
SPARSE_KERNELS = (CSR_ADDMM, CSR_LINEAR)
# Layers with fewer zeros are not timed at all: CSR reads 8 bytes per kept weight (value + int32 index), so below
# 50% zeros it reads more than the dense weight; at 50% it was slower than dense in 8 of 9 measured cases.
MIN_SPARSITY = 0.5


class SparseLinear(nn.Module):
    """`nn.Linear` for inference with its weight as a CSR matrix (int32 indices); outputs equal to float tolerance.

    Its state dict holds the CSR matrix, which safetensors cannot store: save weights (`save_sparse`) before
    switching layers, or from the dense model.
    """

    def __init__(self, linear: nn.Linear, kernel: str = CSR_ADDMM) -> None:
        super().__init__()
        if kernel not in SPARSE_KERNELS:
            raise PrunekitError(f"sparse kernel {kernel!r} is unknown; use one of {', '.join(SPARSE_KERNELS)}")
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        self.register_buffer("weight", _csr(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == CSR_LINEAR:
            out = nn.functional.linear(rows, self.weight, self.bias)
        elif self.bias is None:
            out = torch.sparse.mm(self.weight, rows.t()).t()
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, rows.t()).t()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kept = self.weight.values().numel()
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel}, kept={kept}"


def _csr(weight: Tensor) -> Tensor:
    """CSR with int32 indices: half the index memory of torch's default int64, read on every product."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and said in the docs once
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                   check_invariants=False)  # made by to_sparse_csr: valid by construction


@dataclass(frozen=True)
class LayerDecision:
    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: dict[str, float]  # per candidate kernel, dense included
    kernel: str  # the fastest; DENSE when no sparse kernel beat it


@dataclass(frozen=True)
class SparseLayersReport:
    """The per-layer measurements and the end-to-end verdict of `sparsify_linear_layers`."""

    layers: list[LayerDecision]
    dense_seconds: float  # the whole model, every layer dense
    sparse_seconds: float | None  # the whole model with the faster layers sparse; None when none was faster
    kept: bool  # whether the sparse layers stay: only when faster end to end

    @property
    def sparse_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kernel != DENSE] if self.kept else []

    @property
    def speedup(self) -> float:
        """Dense latency over the latency of the model as it is left (1.0 when left dense)."""
        return self.dense_seconds / self.sparse_seconds if self.kept else 1.0

    def __str__(self) -> str:
        rows = [[layer.name, "×".join(map(str, layer.shape)), f"{layer.sparsity:.3f}",
                 f"{layer.seconds[DENSE] * 1e6:.0f}",
                 f"{min(layer.seconds[k] for k in SPARSE_KERNELS if k in layer.seconds) * 1e6:.0f}", layer.kernel]
                for layer in self.layers]
        table = render_table(["layer", "shape", "sparsity", "dense µs", "best sparse µs", "chosen"], rows)
        if self.sparse_seconds is None:
            return f"{table}\nno layer was faster sparse: the model stays dense"
        verdict = "kept" if self.kept else "not faster end to end: every layer stays dense"
        return (f"{table}\nend to end: dense {self.dense_seconds * 1e3:.2f} ms, with sparse layers "
                f"{self.sparse_seconds * 1e3:.2f} ms ({self.dense_seconds / self.sparse_seconds:.2f}×): {verdict}")


def sparsify_linear_layers(model: nn.Module, example_inputs: Batch, *, min_sparsity: float = MIN_SPARSITY,
                           timer: Timer = measure) -> SparseLayersReport:
    """Replace, in place, each `nn.Linear` that runs faster as a CSR matrix on `example_inputs` by a SparseLinear.

    Each layer with at least `min_sparsity` zeros is timed dense and with every sparse kernel on the input it
    receives from `example_inputs` (a tensor, or a mapping of keyword inputs); the fastest wins. Then the whole
    model is timed with the winners sparse against all dense, and the sparse layers stay only if faster.
    `timer(what, {label: fn}) -> {label: seconds}` does the timing (tests give a fake one).
    """
    if get_masks(model):
        raise PrunekitError("the model still has masks attached: fold them in first with prunekit.make_permanent "
                            "(sparse layers are for inference)")
    linears = _sparse_enough(model, min_sparsity)
    inputs = _layer_inputs(model, example_inputs, linears)
    layers = [_decide(name, linears[name], inputs[name], timer) for name in linears if name in inputs]
    chosen = {layer.name: SparseLinear(linears[layer.name], layer.kernel) for layer in layers if layer.kernel != DENSE}
    dense_run = lambda: call_model(model, example_inputs)  # noqa: E731
    if not chosen:
        return SparseLayersReport(layers, timer("model", {DENSE: dense_run})[DENSE], None, False)
    candidate = _sharing_copy(model)
    _swap(candidate, chosen)
    seconds = timer("model", {DENSE: dense_run, "sparse": lambda: call_model(candidate, example_inputs)})
    kept = seconds["sparse"] < seconds[DENSE]
    if kept:
        _swap(model, chosen)
    return SparseLayersReport(layers, seconds[DENSE], seconds["sparse"], kept)


def _sparse_enough(model: nn.Module, min_sparsity: float) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and _sparsity(module.weight) >= min_sparsity}


def _sparsity(weight: Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def _layer_inputs(model: nn.Module, example_inputs: Batch, linears: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """The input each layer receives in one forward pass of the examples (layers not called are absent)."""
    inputs: dict[str, Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: inputs.setdefault(name, args[0]))
             for name, module in linears.items()]
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _decide(name: str, linear: nn.Linear, x: Tensor, timer: Timer) -> LayerDecision:
    candidates: dict[str, Callable[[], Any]] = {DENSE: lambda: linear(x)}
    for kernel in SPARSE_KERNELS:
        candidates[kernel] = (lambda layer: lambda: layer(x))(SparseLinear(linear, kernel))
    seconds = timer(name, candidates)
    fastest = min(seconds, key=seconds.get)
    return LayerDecision(name, (linear.out_features, linear.in_features), _sparsity(linear.weight), seconds, fastest)


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        model.set_submodule(name, module)


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors (no memory doubled)."""
    tensors = [*model.parameters(), *model.buffers()]
    return copy.deepcopy(model, memo={id(tensor): tensor for tensor in tensors})
