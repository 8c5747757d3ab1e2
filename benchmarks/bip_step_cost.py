"""BiP's wall time per backward example against plain masked training's (goal: ratio <= 1.3).

    PRUNEKIT_DATA=../shared/datasets .venv/bin/python benchmarks/bip_step_cost.py [--repeats 3] [--profile]

LeNet-300-100 on Fashion-MNIST (19,200 training images unless --train-size), batch 128, 0.95
global sparsity, one epoch each, 1 torch thread unless --threads. "masked" is OMP
with LR rewinding: one-shot magnitude, then one epoch of training under the fixed mask, which is
what every IMP round does; "bip" is one epoch of BiP's bi-level iterations (two forward and
backward passes per iteration, one per level). Both are timed by prune()'s own cost meter, and
the ratio compares seconds per example through a backward pass, in wall time and in this process's
CPU time (which a shared machine's load disturbs less). The two run interleaved and each figure
is the median (and the minimum, the least disturbed) over repeats, so background load affects
both sides alike. `--profile`
prints the top of a cProfile of one BiP epoch (where an iteration's time goes).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import os
import platform
import pstats
import statistics
import time

import torch

import prunekit
from prunekit.workflow import setup

SPARSITY = 0.95
BATCH = 128
RECIPE = {"epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
RUNS = {"masked": ("omp", {"rewind": "lr"}), "bip": ("bip", {})}


def seconds_per_backward_example(model, loader, method: str, extra: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per example through a backward pass."""
    started = time.process_time()
    result = prunekit.prune(copy.deepcopy(model), method, SPARSITY, loader, seed=0, **RECIPE, **extra)
    cpu = time.process_time() - started
    return result.cost.seconds / result.cost.backward_examples, cpu / result.cost.backward_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=19200, help="training images (150 batches)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one BiP epoch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = setup("lenet300", "fashion-mnist", os.environ.get("PRUNEKIT_DATA"), train_size=args.train_size)
    loader = data.loader("train", BATCH, shuffle=True, seed=0)
    model = data.model
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(seconds_per_backward_example, model, loader, *RUNS["bip"])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in RUNS}
    for _ in range(args.repeats):
        for name, (method, extra) in RUNS.items():
            times[name].append(seconds_per_backward_example(model, loader, method, extra))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} at the end; {args.repeats} repeats")
    for index, clock in enumerate(("wall", "CPU")):
        for statistic in (statistics.median, min):
            masked, bip = (statistic(t[index] for t in times[name]) for name in RUNS)
            print(f"{clock:>4} {statistic.__name__:>6}: masked training {masked * 1e6:.2f} µs, bip {bip * 1e6:.2f} µs "
                  f"per backward example, bip / masked {bip / masked:.2f} (goal <= 1.3)")

if __name__ == "__main__":
    main()
