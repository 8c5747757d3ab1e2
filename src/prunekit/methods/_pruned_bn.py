"""Batch norm of a pruned filter's channel from its running statistics, while filter masks are being learned.

A filter that the mask removes outputs zeros. In training mode the batch norm after it then sees a
channel with zero mean and zero variance, and its backward pass multiplies that channel's
gradient by γ/√eps (≈ 316·γ at eps = 1e-5) instead of γ/σ: the filter's score gradient is
hundreds of times the kept filters' (or exactly zero where the constant output β is cut by the
ReLU), so filter-wise BiP keeps swapping filters in and out (benchmarks/RESULTS.md, issue 14).

`RunningStatsForPrunedChannels` normalises such a channel with its running mean and variance,
as evaluation does, and leaves them as they were before the pruning; kept channels are untouched.
Its gradient is then γ/√(running var + eps) times the upstream one, on the kept channels' scale.
Convolutions are matched to the batch norm they feed directly, found in the first forward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..targets import Target


class RunningStatsForPrunedChannels:
    """A context manager over training: while it is open, pruned channels use their running statistics.

    `masks()` gives the current masks (nonzero = kept) by target name; a filter is pruned when its
    whole slice along the target's output dimension is.
    """

    def __init__(self, model: nn.Module, targets: list[Target], masks: Callable[[], Mapping[str, torch.Tensor]]):
        self.model = model
        self.convolutions = {t.module: t for t in targets if isinstance(t.module, nn.modules.conv._ConvNd)}
        self.masks = masks
        self.fed_by: dict[nn.Module, Target] = {}  # batch norm -> the convolution whose output it normalises
        self._outputs: dict[int, tuple[torch.Tensor, Target]] = {}
        self._saved: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._matching: list = []  # the hooks that pair convolutions with batch norms, for one forward pass
        self._hooks: list = []

    def __enter__(self) -> RunningStatsForPrunedChannels:
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self._matching = [conv.register_forward_hook(self._remember_output) for conv in self.convolutions]
        self._matching.append(self.model.register_forward_hook(self._stop_matching))
        for norm in norms:
            self._hooks += [norm.register_forward_pre_hook(self._before_norm),
                            norm.register_forward_hook(self._after_norm)]
        return self

    def __exit__(self, *exc) -> None:
        self._stop_matching()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _remember_output(self, conv: nn.Module, inputs, output: torch.Tensor) -> None:
        self._outputs[id(output)] = (output, self.convolutions[conv])

    def _stop_matching(self, *forward) -> None:
        """After the first forward pass every convolution → batch norm pair is known."""
        for handle in self._matching:
            handle.remove()
        self._matching, self._outputs = [], {}

    def _before_norm(self, norm: nn.Module, inputs) -> None:
        produced = self._outputs.get(id(inputs[0]))
        if produced is not None and produced[0] is inputs[0]:
            self.fed_by[norm] = produced[1]
        if norm.training and norm in self.fed_by:
            self._saved[norm] = (norm.running_mean.clone(), norm.running_var.clone())

    def _after_norm(self, norm: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        saved = self._saved.pop(norm, None)
        if saved is None:
            return None
        pruned = self._pruned_channels(self.fed_by[norm])
        if pruned.numel() == 0:
            return None
        # The statistics stay what they were when the filter was pruned. New tensors, not an in-place
        # write: the batch norm's backward pass checks the versions of the buffers it was given.
        with torch.no_grad():
            norm.running_mean = norm.running_mean.index_copy(0, pruned, saved[0][pruned])
            norm.running_var = norm.running_var.index_copy(0, pruned, saved[1][pruned])
        return output.index_copy(1, pruned, _normalised_with_running_stats(norm, inputs[0], pruned))

    def _pruned_channels(self, target: Target) -> torch.Tensor:
        mask = self.masks()[target.name]
        kept = mask.movedim(target.layout.output_dim, 0).flatten(1).any(dim=1)
        return torch.nonzero(~kept).flatten()


def _normalised_with_running_stats(norm: nn.Module, inputs: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """What the batch norm computes in evaluation mode, for `channels` of `inputs` (N × C × ...)."""
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    scale = (norm.running_var[channels] + norm.eps).rsqrt()
    shift = -norm.running_mean[channels] * scale
    if norm.affine:
        scale, shift = scale * norm.weight[channels], shift * norm.weight[channels] + norm.bias[channels]
    return inputs.index_select(1, channels) * scale.view(shape) + shift.view(shape)
