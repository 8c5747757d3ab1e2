"""Peak memory of one one-shot prune of ResNet-20 on CIFAR-10, each method in a fresh process (issue 4).

    PRUNEKIT_DATA=../shared/datasets .venv/bin/python benchmarks/chita_memory.py [--sparsity 0.7]
        [--methods woodfisher,chita-block,chita,chita++]

In one long process the allocator keeps what an earlier prune freed, so the rise of resident memory
during a later prune undercounts it (chita_resnet20.py's peak column). Here every method runs in its
own process and the table gives its peak resident memory above the process's footprint just before
the prune (model, data and the calibration batches loaded), with the n = 1000 gradients of the
reproduction and the settings chita_resnet20.py chose most often. Accuracy is not measured.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "woodfisher" / "resnet20_cifar10.pth.tar"
BLOCK = {"solver": "block", "block_size": 500, "precision": "float32", "ridge": 1e-4}
SETTINGS = {
    "woodfisher": ("woodfisher", {"dampening": 1e-5, "block_size": 1000, "steps": 2}),
    "chita-block": ("chita", {**BLOCK, "pursuit_rounds": 0}),
    "chita": ("chita", BLOCK),
    "chita++": ("chita++", {**BLOCK, "stages": 10, "pursuit_rounds": 0}),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(column: str, sparsity: float) -> dict:
    """Run in the child process: one prune, its peak memory above the footprint before it."""
    import torch

    import prunekit
    from prunekit import workflow

    torch.set_num_threads(1)
    setup = workflow.setup("resnet20", "cifar10", None, CHECKPOINT)
    data = workflow.calibration_loader(setup, 128, seed=0)
    before = peak_mib()
    method, hparams = SETTINGS[column]
    result = prunekit.prune(setup.model, method, sparsity, data, seed=0, **hparams)
    return {"column": column, "sparsity": sparsity, "peak_above_start_mib": peak_mib() - before,
            "process_peak_mib": peak_mib(), "seconds": result.cost.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--methods", default=",".join(SETTINGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.sparsity)))
        return
    print("| method | sparsity | peak above the start (MiB) | process peak (MiB) | seconds |\n|---|---|---|---|---|")
    for column in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", column, "--sparsity", str(args.sparsity)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {column} | {args.sparsity:g} | {row['peak_above_start_mib']:.0f} | {row['process_peak_mib']:.0f} | "
              f"{row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
