"""Overhead of a masked training step against the dense step (goal: ratio <= 1.10).

    .venv/bin/python benchmarks/masked_step_overhead.py [--steps 200] [--repeats 7] [--threads 2]

One SGD step (forward, backward, optimizer) at batch 128 on MLPNet (1x28x28) and ResNet-20
(3x32x32), dense vs 90%-sparse masks in both gradient modes. Dense and masked runs are interleaved
and the ratio is the median over repeats, so background load affects both sides alike.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

import prunekit
from prunekit.masks import STRAIGHT_THROUGH, set_gradient_mode
from prunekit.models import create_model


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(max(3, steps // 10)):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(name: str, steps: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    dense = create_model(name)
    masked = copy.deepcopy(dense)
    prunekit.prune(masked, "magnitude", 0.9)
    straight = copy.deepcopy(masked)
    set_gradient_mode(straight, STRAIGHT_THROUGH)
    x = torch.randn(128, *dense.input_shape)
    y = torch.randint(0, 10, (128,))
    times: dict[str, list[float]] = {"dense": [], "masked": [], "straight_through": []}
    for _ in range(repeats):
        for label, model in (("dense", dense), ("masked", masked), ("straight_through", straight)):
            times[label].append(step_seconds(model, x, y, steps))
    ratios = {label: statistics.median(t / d for t, d in zip(times[label], times["dense"]))
              for label in ("masked", "straight_through")}
    return {"dense_ms": statistics.median(times["dense"]) * 1e3, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="mlpnet,resnet20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':10} {'dense step':>12} {'masked/dense':>14} {'straight-through/dense':>24}")
    for name in args.models.split(","):
        steps = args.steps if name == "mlpnet" else max(5, args.steps // 20)
        result = measure(name, steps, args.repeats)
        print(f"{name:10} {result['dense_ms']:10.3f}ms {result['masked']:14.3f} {result['straight_through']:24.3f}")


if __name__ == "__main__":
    main()
