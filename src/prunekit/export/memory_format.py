"""Memory format: a CNN's weights in channels_last where that is measured faster on the machine at hand.

torch's CPU convolutions (oneDNN) run in channels_last when the weight is channels_last, whatever the input's
format, and the activations that follow keep it; so converting the model's 4-D weights is enough: inputs need
not be converted, and the outputs equal the contiguous model's to float rounding. Whether it pays depends on
the model, the batch, the threads and the CPU (benchmarks/RESULTS.md: 1.2-1.9x faster on the zoo at batch
128 with 2 threads), so it is measured, in the spirit of `sparse_layers`: the model is timed in both formats
on its example inputs (interleaved turns, `timing`) and left in the faster; a tie keeps the format it had, so
the choice is never slower than what the user had, as far as the measurement can tell. A format whose outputs
differ or that fails (a `.view` that channels_last strides cannot take) is not a candidate. Models without
4-D weights (MLPs, transformers) are left alone without being timed.

Files are written contiguous whatever the format (safetensors stores contiguous tensors; `save_model` makes
them so); a compact file records the format chosen (`compact_files`), which `load_compact` applies again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..channels import tensors_in
from ..errors import PrunekitError
from ..modes import model_mode
from ..objectives import Batch, call_model
from .timing import Timer, measure

CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"
MEMORY_FORMATS = {CONTIGUOUS: torch.contiguous_format, CHANNELS_LAST: torch.channels_last}
OUTPUT_TOLERANCE = 1e-5  # relative to the largest output: a format only reorders a convolution's sums


@dataclass(frozen=True)
class MemoryFormatChoice:
    """What `fastest_memory_format` measured and chose."""

    chosen: str  # CONTIGUOUS or CHANNELS_LAST: the format the model is left in
    before: str  # the format it had
    seconds: dict[str, float] = field(default_factory=dict)  # per format timed; empty when nothing was timed
    reason: str | None = None  # why only one format was a candidate (no 4-D weight, outputs that differ)

    @property
    def memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.chosen]

    @property
    def speedup(self) -> float:
        """Latency in the format the model had over latency in the chosen one (1.0 when nothing was timed)."""
        return self.seconds[self.before] / self.seconds[self.chosen] if len(self.seconds) > 1 else 1.0

    def __str__(self) -> str:
        if len(self.seconds) < 2:
            return f"{self.chosen} ({self.reason})"
        other = next(name for name in self.seconds if name != self.chosen)
        return (f"{self.chosen} {self.seconds[self.chosen] * 1e3:.2f} ms ({other} "
                f"{self.seconds[other] * 1e3:.2f} ms)")


def fastest_memory_format(model: nn.Module, example_inputs: Batch, *, timer: Timer = measure) -> MemoryFormatChoice:
    """Leave `model`, in place, in whichever of contiguous and channels_last runs `example_inputs` faster.

    `example_inputs` is what the model is called with (a tensor, or a mapping of keyword inputs), in the format
    it will be given later (contiguous is fine: the first convolution follows its weight). The model is timed
    in eval mode under `torch.no_grad()` by `timer(what, {label: fn}) -> {label: seconds}` (tests give a fake
    one); the format it had wins ties. Returns what was measured; `.memory_format` is the torch format.
    """
    before = memory_format_of(model)
    if not _four_dimensional(model):
        return MemoryFormatChoice(before, before, reason="no 4-D weight: not timed")
    other = CHANNELS_LAST if before == CONTIGUOUS else CONTIGUOUS
    converted = to_memory_format(copy.deepcopy(model), other)
    with model_mode(model, training=False), model_mode(converted, training=False), torch.no_grad():
        difference = _output_difference(model, converted, example_inputs)
        if difference is not None:
            return MemoryFormatChoice(before, before, reason=f"{other} {difference}: not a candidate")
        seconds = timer("memory format", {before: lambda: call_model(model, example_inputs),
                                          other: lambda: call_model(converted, example_inputs)})
    chosen = other if seconds[other] < seconds[before] else before
    if chosen != before:
        to_memory_format(model, chosen)
    return MemoryFormatChoice(chosen, before, seconds)


def to_memory_format(model: nn.Module, name: str) -> nn.Module:
    """Convert every 4-D parameter and buffer of `model` in place to the format named (CONTIGUOUS or CHANNELS_LAST);
    returns the model. Parameters stay the same objects (an optimizer holding them still works)."""
    if name not in MEMORY_FORMATS:
        raise PrunekitError(f"memory format {name!r} is unknown; use one of {', '.join(MEMORY_FORMATS)}")
    memory_format = MEMORY_FORMATS[name]
    with torch.no_grad():
        for module in model.modules():
            for parameter in module._parameters.values():
                if parameter is not None and parameter.dim() == 4:
                    parameter.data = parameter.data.contiguous(memory_format=memory_format)
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.dim() == 4:
                    module._buffers[key] = buffer.contiguous(memory_format=memory_format)
    return model


def memory_format_of(model: nn.Module) -> str:
    """CHANNELS_LAST when a 4-D weight is laid out so (and not also contiguous, as a 1×1 kernel can be), else
    CONTIGUOUS."""
    for tensor in _four_dimensional(model):
        if tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
            return CHANNELS_LAST
    return CONTIGUOUS


def _four_dimensional(model: nn.Module) -> list[Tensor]:
    return [tensor for tensor in [*model.parameters(), *model.buffers()] if tensor.dim() == 4]


def _output_difference(model: nn.Module, converted: nn.Module, example_inputs: Batch) -> str | None:
    """None when the converted model computes the same outputs; else what went wrong, in words."""
    try:
        got = list(tensors_in(call_model(converted, example_inputs)))
    except RuntimeError as error:  # e.g. `.view` on channels_last activations: "view size is not compatible"
        return f"fails ({str(error).splitlines()[0]})"
    expected = list(tensors_in(call_model(model, example_inputs)))
    if len(got) != len(expected) or not all(map(_same, expected, got)):
        return "changes the outputs"
    return None


def _same(want: Tensor, have: Tensor) -> bool:
    if want.shape != have.shape:
        return False
    if not want.is_floating_point() or not want.numel():
        return torch.equal(want, have)
    return float((want - have).abs().max()) <= OUTPUT_TOLERANCE * max(float(want.abs().max()), 1.0)
