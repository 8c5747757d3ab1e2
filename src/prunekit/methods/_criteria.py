"""Every scoring method's score by name, so that a schedule can rank with any of them.

GMP's mask updates rank by `score=` (magnitude by default): `prune(model, "gmp", 0.9, data,
score="snip")` prunes gradually by connection sensitivity, as `prune(model, "snip", 0.9, data,
stages=5)` prunes iteratively and `prune(model, "snip", ...)` in one shot. A score computed here
takes its method's default settings (SNIP's one batch, OBD's n = 1000 gradients, ...).
"""
from __future__ import annotations

from collections.abc import Callable

from . import PruneContext
from ._gradual import dense_square_magnitude
from ._stages import Criterion
from .magnitude import random_criterion
from .obs import ObdHparams, obd_criterion
from .saliency import GraspHparams, SnipHparams, grasp_criterion, snip_criterion, synflow_criterion

CRITERIA: dict[str, Callable[[PruneContext], Criterion]] = {
    "magnitude": lambda ctx: dense_square_magnitude(ctx.targets),  # squared: groups rank by their L2 norm
    "random": random_criterion,
    "snip": lambda ctx: snip_criterion(ctx, SnipHparams()),
    "grasp": lambda ctx: grasp_criterion(ctx, GraspHparams()),
    "synflow": synflow_criterion,
    "obd": lambda ctx: obd_criterion(ctx, ObdHparams()),
}
