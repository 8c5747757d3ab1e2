"""Latency of compacted CNNs against the dense model and against Torch-Pruning's compaction of the same channels.

    .venv/bin/python benchmarks/compaction_speed.py [--fractions 0.3 0.5 0.7] [--batches 128 1] [--threads 2]
                                                    [--rounds 7] [--models resnet56 resnet20 ...] [--clock wall]
                                                    [--contiguous]

For each zoo CNN and fraction p of channels removed: magnitude pruning with structure="groups" and a
uniform budget (p of every family of coupled channels), then `prunekit.compact` and Torch-Pruning
cutting the very same channels (`prunekit.export.reference`). Printed per row: MACs and parameters of
the compact model over the dense one (against the (1 - p)^2 of removing p on both sides of a layer),
and the speed-up dense / compact at each batch size, with Torch-Pruning's beside it where it can cut
the model. Each model runs in its fastest memory format at each batch size
(`export.memory_format.fastest_memory_format`: contiguous or channels_last, measured): the dense model in
its own, so that the speed-up is compaction's and not the layout's, prunekit's compact model in its own,
and Torch-Pruning's in prunekit's (the same shapes, so the same work); the formats are printed per row
(dense/compact: C contiguous, CL channels_last). `--contiguous` keeps every model contiguous (the table
before the memory format was measured). Dense, prunekit and Torch-Pruning are then timed in turn within
one process, each by its fastest of `--rounds` turns (`export.timing.interleaved_seconds`: other processes
only add time), so a quiet moment is offered to all three alike; the load average is printed at the start
and the end. `--clock cpu --threads 1` times the thread's CPU seconds instead, which other processes on a
busy machine inflate far less than wall time (the ratios of a machine to oneself; not the latency of two
threads).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings

import torch
from torch import nn

import prunekit
from prunekit.export.memory_format import CHANNELS_LAST, CONTIGUOUS, fastest_memory_format, to_memory_format
from prunekit.export.reference import torch_pruning_compact
from prunekit.export.timing import interleaved_seconds
from prunekit.metrics import count_macs
from prunekit.models import create_model

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
SHORT = {CONTIGUOUS: "C", CHANNELS_LAST: "CL"}
MODELS = {
    "resnet56": ("resnet56", {}),
    "resnet56-A": ("resnet56", {"shortcut": "identity"}),
    "resnet20": ("resnet20", {}),
    "resnet20-A": ("resnet20", {"shortcut": "identity"}),
    "vgg16_bn": ("vgg16_bn", {}),
    "mobilenet_v1": ("mobilenet_v1", {}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: latency; cpu: the thread's CPU seconds (needs --threads 1)")
    parser.add_argument("--contiguous", action="store_true",
                        help="keep every model in the contiguous format instead of each in its fastest")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU seconds: add --threads 1")
    return args


def compacted_pair(dense: nn.Module, fraction: float) -> tuple[nn.Module, nn.Module | None]:
    """prunekit's compact model and Torch-Pruning's cut of the same channels (None where it cannot cut it)."""
    masked = copy.deepcopy(dense)
    prunekit.prune(masked, "magnitude", fraction, structure="groups", budget="uniform")
    example = torch.zeros(2, *dense.input_shape)
    ours = prunekit.compact(masked, example).eval()
    try:
        theirs = torch_pruning_compact(masked, example).eval()
        theirs(example)
    except Exception:  # Torch-Pruning 1.6.1 cuts option-A ResNets into a broken model (measured)
        theirs = None
    return ours, theirs


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seconds(candidates, args: argparse.Namespace) -> dict[str, float]:
    return interleaved_seconds(candidates, rounds=args.rounds, clock=CLOCKS[args.clock])


def best_format(model: nn.Module, inputs: torch.Tensor, args: argparse.Namespace) -> str:
    """The model left in its fastest memory format on `inputs` (contiguous under --contiguous); its name."""
    if args.contiguous:
        return CONTIGUOUS
    return fastest_memory_format(model, inputs, timer=lambda what, candidates: seconds(candidates, args)).chosen


def row(name: str, dense: nn.Module, dense_formats: dict[int, str], fraction: float,
        args: argparse.Namespace) -> str:
    ours, theirs = compacted_pair(to_memory_format(dense, CONTIGUOUS), fraction)
    macs = count_macs(ours, dense.input_shape).dense / count_macs(dense, dense.input_shape).dense
    cells = [name, f"{fraction:.1f}", f"{(1 - fraction) ** 2:.3f}", f"{macs:.3f}",
             f"{parameters(ours) / parameters(dense):.3f}"]
    for batch in args.batches:
        inputs = torch.randn(batch, *dense.input_shape)
        to_memory_format(dense, dense_formats[batch])
        compact_format = best_format(ours, inputs, args)
        candidates = {"dense": lambda: dense(inputs), "prunekit": lambda: ours(inputs)}
        if theirs is not None:
            to_memory_format(theirs, compact_format)
            candidates["torch-pruning"] = lambda: theirs(inputs)
        measured = seconds(candidates, args)
        cells.append(f"{measured['dense'] * 1e3:.1f}")
        cells.append(f"{SHORT[dense_formats[batch]]}/{SHORT[compact_format]}")
        cells.append(f"{measured['dense'] / measured['prunekit']:.2f}×")
        cells.append(f"{measured['dense'] / measured['torch-pruning']:.2f}×" if theirs is not None else "n/a")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Torch-Pruning's notices about unwrapped parameters
    formats = "contiguous memory format" if args.contiguous else "each model in its fastest memory format"
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.clock} clock, {formats}; load average at start {os.getloadavg()[0]:.2f}")
    header = ["model", "p", "(1-p)²", "MACs", "params"]
    for batch in args.batches:
        header += [f"b{batch} dense ms", f"b{batch} formats", f"b{batch} prunekit", f"b{batch} Torch-Pruning"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.models:
        model_name, options = MODELS[name]
        torch.manual_seed(0)
        dense = create_model(model_name, **options).eval()
        # The dense model's format per batch size is measured once per model, not once per fraction.
        dense_formats = {batch: best_format(dense, torch.randn(batch, *dense.input_shape), args)
                         for batch in args.batches}
        for fraction in args.fractions:
            print(row(name, dense, dense_formats, fraction, args), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
