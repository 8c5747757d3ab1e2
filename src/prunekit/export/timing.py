"""Latency measured fairly on a shared machine: alternatives timed in turn, each its fastest turn."""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch

# Times a set of alternatives for one thing (`what`: a layer's name, or "model"): {label: seconds per call}.
Timer = Callable[[str, Mapping[str, Callable[[], Any]]], dict[str, float]]


ROUNDS = 5  # turns per candidate
MIN_SECONDS = 0.01  # each turn lasts at least this long, so that the clock's resolution is negligible


def interleaved_seconds(candidates: Mapping[str, Callable[[], Any]], rounds: int | None = None,
                        min_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter
                        ) -> dict[str, float]:
    """Seconds per call of each candidate in its fastest of `rounds` turns, the candidates timed in turn.

    Other processes only ever add time, so the fastest turn is the closest to the candidate's own cost (on a
    busy machine a median measures the load); turns alternate so that a quiet moment is offered to every
    candidate alike. Each turn repeats the call until it lasts `min_seconds` (the count fixed per candidate by
    a warm-up call). `clock` may be `time.thread_time` for one thread's CPU seconds, which a busy machine
    inflates far less than wall time (single-threaded runs only: other threads' work is not counted).
    """
    rounds, min_seconds = rounds or ROUNDS, MIN_SECONDS if min_seconds is None else min_seconds
    with torch.no_grad():
        calls = {label: _calls_lasting(fn, min_seconds, clock) for label, fn in candidates.items()}
        times: dict[str, list[float]] = {label: [] for label in candidates}
        for _ in range(rounds):
            for label, fn in candidates.items():
                started = clock()
                for _ in range(calls[label]):
                    fn()
                times[label].append((clock() - started) / calls[label])
    return {label: min(values) for label, values in times.items()}


def measure(what: str, candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """The default `Timer`: `interleaved_seconds` on `default_clock()` (what is measured does not change how)."""
    return interleaved_seconds(candidates, clock=default_clock())


def default_clock() -> Callable[[], float]:
    """The thread's CPU time when torch computes on this one thread, else wall time.

    On the shared 2-core machine under load 12, wall time put the same dense MiniLM 25% apart from itself, while
    one thread's CPU time gave every layer of it a consistent verdict (benchmarks/RESULTS.md). With several threads
    the CPU time of one is not the latency, so wall time it is.
    """
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name(clock: Callable[[], float]) -> str:
    return "thread CPU time" if clock is time.thread_time else "wall time"


def _calls_lasting(fn: Callable[[], Any], min_seconds: float, clock: Callable[[], float]) -> int:
    fn()  # warm-up: first-call allocations and lazy initialisation are not latency
    started = clock()
    fn()
    once = max(clock() - started, 1e-7)
    return max(1, round(min_seconds / once))
