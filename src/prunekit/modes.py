"""Running a model in a given mode for a while, its own mode restored afterwards."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`model.train(training)` inside the block; the model's previous mode after it, even on error."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
