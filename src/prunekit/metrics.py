"""What a pruned model costs to run: multiply–accumulates (MACs) of its Conv and Linear layers (and
transformers' Conv1D, a Linear stored in × out).

Counted by forward hooks on one example, so any architecture is measured without being described: zeros of
an input shape (images), or an example itself (a tensor, or a mapping of tensors such as a tokenised text,
passed as `model(**example)`). For a sequence the count is per the example's tokens: every token position
is an output position.

A weight takes part in one MAC per output position it produces (`output / (batch × out_channels)`
positions: 1 for Linear on a vector, H_out·W_out for a 2-d convolution, L for Linear on L tokens), so
the dense count is weights × positions and the masked count is nonzero weights × positions: the
theoretical cost of a sparse kernel that skips zeros (ShrinkBench's "nonzero FLOPs"). Biases, normalisation and
activations are left out, as usual. FLOPs are conventionally 2 × MACs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .modes import model_mode
from .objectives import call_model, to_device
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


# One example to count on: the shape of an input (C, H, W), fed as zeros, or the example itself (batch of one).
Example = tuple[int, ...] | torch.Tensor | Mapping[str, torch.Tensor]


def count_macs(model: nn.Module, example: Example) -> Macs:
    """MACs of one forward pass of one example, per Conv/Linear weight: `example` is an input shape (C, H, W),
    fed as zeros, or a batch of one example (a tensor, or a mapping passed as `model(**example)`)."""
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
            call_model(model, _batch_of_one(example, reference))
    finally:
        for handle in handles:
            handle.remove()
    return Macs([LayerMacs(name, dense, masked) for name, (dense, masked) in counts.items()])


def _batch_of_one(example: Example, reference: torch.Tensor) -> torch.Tensor | Mapping[str, torch.Tensor]:
    """The model's input: zeros of a shape in the model's dtype, or the example on the model's device."""
    if isinstance(example, (torch.Tensor, Mapping)):
        return to_device(example, reference.device)
    return torch.zeros((1, *example), dtype=reference.dtype, device=reference.device)


def _counter(name: str, layout: Layout, counts: dict[str, list[int]]):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        weight = module.weight  # the masked weight when a mask is attached
        positions = output.numel() // (output.shape[0] * weight.shape[layout.output_dim])
        dense, masked = counts.setdefault(name, [0, 0])  # a module called twice counts twice
        counts[name] = [dense + weight.numel() * positions, masked + int(torch.count_nonzero(weight)) * positions]
    return hook
