"""What a pruned model costs to run: multiply–accumulates (MACs) of its Conv and Linear layers (and
transformers' Conv1D, a Linear stored in × out).

Counted by forward hooks on one example, so any architecture is measured without being described.
A weight takes part in one MAC per output position it produces (`output / (batch × out_channels)`
positions: 1 for Linear on a vector, H_out·W_out for a 2-d convolution), so the dense count is
weights × positions and the masked count is nonzero weights × positions: the theoretical cost of
a sparse kernel that skips zeros (ShrinkBench's "nonzero FLOPs"). Biases, normalisation and
activations are left out, as usual. FLOPs are conventionally 2 × MACs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modes import model_mode
from .targets import EMBEDDINGS, Layout, weight_layout


@dataclass(frozen=True)
class LayerMacs:
    name: str  # the weight's state-dict name, e.g. `fc1.weight`
    dense: int
    masked: int


@dataclass(frozen=True)
class Macs:
    """MACs per example of every Conv/Linear layer, dense and with the zeros of its weights skipped."""

    layers: list[LayerMacs]

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def masked(self) -> int:
        return sum(layer.masked for layer in self.layers)

    @property
    def speedup(self) -> float:
        """Theoretical speed-up of the masked model over the dense one (dense / masked MACs)."""
        return self.dense / self.masked if self.masked else float("inf")


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> Macs:
    """MACs of one forward pass of one example of `input_shape` (C, H, W), per Conv/Linear weight."""
    counts: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        layout = weight_layout(module)
        if layout is not None and not isinstance(module, EMBEDDINGS):  # a lookup multiplies nothing
            weight_name = f"{name}.weight" if name else "weight"
            handles.append(module.register_forward_hook(_counter(weight_name, layout, counts)))
    reference = next(model.parameters())
    try:
        with torch.no_grad(), model_mode(model, training=False):
            model(torch.zeros((1, *input_shape), dtype=reference.dtype, device=reference.device))
    finally:
        for handle in handles:
            handle.remove()
    return Macs([LayerMacs(name, dense, masked) for name, (dense, masked) in counts.items()])


def _counter(name: str, layout: Layout, counts: dict[str, list[int]]):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        weight = module.weight  # the masked weight when a mask is attached
        positions = output.numel() // (output.shape[0] * weight.shape[layout.output_dim])
        dense, masked = counts.setdefault(name, [0, 0])  # a module called twice counts twice
        counts[name] = [dense + weight.numel() * positions, masked + int(torch.count_nonzero(weight)) * positions]
    return hook
