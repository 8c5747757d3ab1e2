"""The cost of pruning: wall time, forward/backward passes, peak memory."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class Cost:
    seconds: float = 0.0
    forward_passes: int = 0
    forward_examples: int = 0
    backward_passes: int = 0
    backward_examples: int = 0
    peak_memory_bytes: int = 0
    planned_memory_bytes: int = 0  # the method's estimate of that peak, checked against --max-memory (0: none made)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.seconds:.2f} s, {self.forward_examples} examples forward / {self.backward_examples} backward "
                f"({self.forward_passes}/{self.backward_passes} passes), peak +{self.peak_memory_bytes / 2**20:.0f} MiB"
                + (f" (planned {self.planned_memory_bytes / 2**20:.0f})" if self.planned_memory_bytes else ""))


class CostMeter:
    """Measures a block of work on a model.

    Passes are counted by a forward hook on the model (and a gradient hook on its output for the
    backward pass), so any method is measured without cooperating; code that evaluates the model
    through torch.func transforms counts its examples itself with `count` inside `paused()`.
    Peak memory is the largest rise of the process's resident memory over its level at the start
    (sampled every few milliseconds), or of allocated CUDA memory on a GPU.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", sample_every: float = 0.005):
        self.model = model
        self.device = torch.device(device)
        self.cost = Cost()
        self._sample_every = sample_every
        self._paused = 0
        self._hook = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._base_memory = 0

    def __enter__(self) -> "CostMeter":
        self._hook = self.model.register_forward_hook(self._on_forward)
        self._start_memory()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cost.seconds += time.perf_counter() - self._start
        self._hook.remove()
        self._stop_memory()

    def snapshot(self) -> Cost:
        """The cost so far, while the block is still running."""
        current = Cost(**self.cost.to_dict())
        current.seconds += time.perf_counter() - self._start
        if self.device.type == "cuda":
            current.peak_memory_bytes = max(current.peak_memory_bytes,
                                            torch.cuda.max_memory_allocated(self.device) - self._base_memory)
        else:
            current.peak_memory_bytes = max(current.peak_memory_bytes, self._peak - self._base_memory)
        return current

    def count(self, forward_examples: int = 0, backward_examples: int = 0, passes: int = 1) -> None:
        """Record passes made where the hooks cannot see them."""
        if forward_examples:
            self.cost.forward_passes += passes
            self.cost.forward_examples += forward_examples
        if backward_examples:
            self.cost.backward_passes += passes
            self.cost.backward_examples += backward_examples

    @contextlib.contextmanager
    def paused(self):
        """Do not count passes through the hooks inside this block."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _on_forward(self, module, inputs, output) -> None:
        if self._paused or not inputs or not torch.is_tensor(inputs[0]):
            return
        examples = inputs[0].shape[0] if inputs[0].dim() else 1
        self.cost.forward_passes += 1
        self.cost.forward_examples += examples
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(lambda grad: self.count(backward_examples=examples))

    # ---- memory

    def _start_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_memory = torch.cuda.memory_allocated(self.device)
            return
        self._base_memory = _resident_bytes()
        self._peak = self._base_memory
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._sample_every):
            self._peak = max(self._peak, _resident_bytes())

    def _stop_memory(self) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, _resident_bytes())
        self.cost.peak_memory_bytes = max(self.cost.peak_memory_bytes, peak - self._base_memory)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best the OS offers
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
