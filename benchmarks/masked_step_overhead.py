"""Overhead of a masked training step against the dense step (goal: ratio <= 1.10).

    .venv/bin/python benchmarks/masked_step_overhead.py [--steps 200] [--repeats 7] [--threads 2]

Batch 128 on MLPNet (1x28x28) and ResNet-20 (3x32x32), dense vs 90%-sparse masks in both gradient
modes, measured two ways: the bare SGD step (forward, backward, optimizer) on a fixed batch, and
the step as prunekit's Trainer runs it (Loader batches from uint8 images, normalisation, metrics).
Dense and masked runs are interleaved and each ratio is the median over repeats, so background
load affects both sides alike.
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
from prunekit.data import Loader, TensorSplit
from prunekit.masks import STRAIGHT_THROUGH, set_gradient_mode
from prunekit.models import create_model
from prunekit.training import TrainConfig, Trainer

MODES = ("dense", "masked", "straight_through")


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


def trainer_step_seconds(model: nn.Module, split: TensorSplit, steps: int) -> float:
    channels = split.images.shape[1]
    loader = Loader(split, 128, shuffle=True, mean=(0.5,) * channels, std=(0.25,) * channels, drop_last=True)
    config = TrainConfig(epochs=1, lr=0.01, weight_decay=1e-4)
    start = time.perf_counter()
    Trainer(model, loader, config, progress=False).fit()
    return (time.perf_counter() - start) / steps


def three_models(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = create_model(name)
    masked = copy.deepcopy(dense)
    prunekit.prune(masked, "magnitude", 0.9)
    straight = copy.deepcopy(masked)
    set_gradient_mode(straight, STRAIGHT_THROUGH)
    return {"dense": dense, "masked": masked, "straight_through": straight}


def measure(name: str, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    models = three_models(name)
    shape = models["dense"].input_shape
    x, y = torch.randn(128, *shape), torch.randint(0, 10, (128,))
    split = TensorSplit(torch.randint(0, 256, (128 * steps, *shape), dtype=torch.uint8),
                        torch.randint(0, 10, (128 * steps,)))
    ways = {"step": lambda m: step_seconds(m, x, y, steps), "trainer": lambda m: trainer_step_seconds(m, split, steps)}
    results = {}
    for way, timer in ways.items():
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                times[mode].append(timer(models[mode]))
        results[way] = {"dense_ms": statistics.median(times["dense"]) * 1e3,
                        **{mode: statistics.median(t / d for t, d in zip(times[mode], times["dense"]))
                           for mode in MODES[1:]}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="mlpnet,resnet20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':10} {'measured':8} {'dense step':>12} {'masked/dense':>14} {'straight-through/dense':>24}")
    for name in args.models.split(","):
        steps = args.steps if name == "mlpnet" else max(10, args.steps // 10)
        for way, r in measure(name, steps, args.repeats).items():
            print(f"{name:10} {way:8} {r['dense_ms']:10.3f}ms {r['masked']:14.3f} {r['straight_through']:24.3f}")


if __name__ == "__main__":
    main()
