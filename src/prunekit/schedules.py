"""Sparsity over time: per training step (gradual pruning) or per stage (multi-stage, IMP rounds).

A step schedule maps a step t to a sparsity that rises from `initial` at `start` to `target` at
`end` and stays there. A stage schedule is the list of sparsities of T stages ending exactly at
the target.
"""
from __future__ import annotations

from dataclasses import dataclass

from .budgets import check_sparsity
from .errors import PrunekitError

STEP_SHAPES = ("constant", "linear", "cubic", "exponential")
STAGE_SCHEDULES = ("linear", "cubic", "exponential", "geometric", "constant")


@dataclass(frozen=True)
class StepSchedule:
    """Sparsity at training step t; cubic is Zhu & Gupta (2017), constant is one-shot at `start`."""

    target: float
    start: int
    end: int
    initial: float = 0.0
    shape: str = "cubic"

    def __post_init__(self) -> None:
        check_sparsity(self.target, "target sparsity")
        check_sparsity(self.initial, "initial sparsity")
        if self.shape not in STEP_SHAPES:
            raise PrunekitError(f"schedule shape {self.shape!r} is unknown; use one of {', '.join(STEP_SHAPES)}")
        if self.start < 0 or self.end < self.start:
            raise PrunekitError(f"the pruning schedule must end after it starts (start {self.start}, end {self.end})")

    def __call__(self, step: int) -> float:
        if step < self.start:
            return self.initial
        if step >= self.end or self.shape == "constant":
            return self.target
        progress = (step - self.start) / (self.end - self.start)
        return self.initial + (self.target - self.initial) * _rise(progress, self.shape)


def _rise(progress: float, shape: str) -> float:
    """Fraction of the way from initial to target, 0 at progress 0 and 1 at progress 1."""
    if shape == "linear":
        return progress
    if shape == "cubic":
        return 1 - (1 - progress) ** 3
    return (1 - 2 ** (-progress * 10)) / (1 - 2 ** -10)  # exponential: fast early, flat late


def stage_sparsities(target: float, stages: int, kind: str = "exponential", base: float = 0.1) -> list[float]:
    """Sparsities of `stages` stages, the last one exactly `target`.

    linear/cubic/exponential rise from `base` (the CHITA++ schedules; exponential is
    s0 + (s - s0)(1 - 2^-t)/(1 - 2^-(T-1))); geometric multiplies the density by a constant factor
    per stage from 1 - base (MFAC); constant repeats the target. For IMP rounds use `imp_rounds`.
    """
    check_sparsity(target, "target sparsity")
    check_sparsity(base, "base sparsity")
    if stages < 1:
        raise PrunekitError(f"the number of stages must be at least 1, got {stages}")
    if kind not in STAGE_SCHEDULES:
        raise PrunekitError(f"stage schedule {kind!r} is unknown; use one of {', '.join(STAGE_SCHEDULES)}")
    if kind != "constant" and base > target:
        raise PrunekitError(f"the base sparsity {base} is above the target {target}; lower --base")
    if stages == 1 or kind == "constant":
        return [target] * stages
    last = stages - 1
    if kind == "geometric":
        ratio = (1 - target) / (1 - base)
        values = [1 - (1 - base) * ratio ** ((t + 1) / stages) for t in range(stages)]
    elif kind == "exponential":
        values = [base + (target - base) * (1 - 2.0 ** -t) / (1 - 2.0 ** -last) for t in range(stages)]
    else:
        values = [base + (target - base) * _rise(t / last, kind) for t in range(stages)]
    values[-1] = target
    return values


def imp_rounds(target: float, rate: float = 0.2) -> list[float]:
    """IMP: prune `rate` of the remaining weights per round until the target; s_r = 1 - (1-rate)^r."""
    check_sparsity(target, "target sparsity")
    if not 0 < rate < 1:
        raise PrunekitError(f"the IMP pruning rate must be in (0, 1), got {rate}")
    values: list[float] = []
    density = 1.0
    while 1 - density < target - 1e-12:
        density *= 1 - rate
        values.append(min(1 - density, target))
    return values
