"""BiP reproduction 3: filter-wise BiP vs filter-wise magnitude + fine-tuning, ResNet-20 on CIFAR-10.

    .venv/bin/python benchmarks/bip_filters.py [--budget short|full] [--quick] [--sparsities 0.3,0.5,0.7]
        [--seeds 0] [--variants bip,magnitude-ft] [--baseline-epochs E] [--device cpu] [--threads 2]
        [--out-dir runs/bip_filters]

Both start from the shared ResNet-20 checkpoint and remove the same fraction of whole output filters
from every convolution (per-layer keep ratio, `budget="uniform"`, `structure="filters"`); the final
linear layer stays dense, as in the official structured code. Sparsity is the fraction of filters.
- bip: filter-wise BiP for E epochs, filters ranked by the L2 norm of their scores (paper Fig. 4);
- magnitude-ft: filters ranked by their mean |w|, then E epochs of fine-tuning under the fixed mask
  with BiP's weight settings (SGD lr 0.1 cosine, momentum 0.9, weight decay 1e-4, batch 128 with
  random crop and flip). `--baseline-epochs 2E` gives it BiP's number of gradient evaluations.
E is 3 epochs (`--budget short`, the 2-core machine) or the paper's 100 (`full`, for a GPU).
`--quick` is a smoke run: 1,024 training and 1,000 test images, 1 epoch, seed 0.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.cost import Cost, CostMeter
from prunekit.training import TrainConfig, Trainer

from bip_resnet20 import (check_variants, common_arguments, epochs_of, finish, output_folder, pretrained, run_once,
                          sweep, train_loader)

FILTERS = {"structure": "filters", "budget": "uniform", "exclude": r"^fc\."}
VARIANTS = ("bip", "magnitude-ft")


def magnitude_then_finetune(model: torch.nn.Module, sparsity: float, data, epochs: int, seed: int,
                            device: str) -> prunekit.PruneResult:
    """Filter-wise magnitude pruning, then fine-tuning; the result's cost covers both."""
    result = prunekit.prune(model, "magnitude", sparsity, seed=seed, **FILTERS)
    config = TrainConfig(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine", seed=seed)
    with CostMeter(model, device) as meter:
        history = Trainer(model, data, config, device=device, progress=False).fit()
    result.cost = _sum(result.cost, meter.cost)
    result.history = [{"phase": "finetune", **metrics} for metrics in history]
    return result


def _sum(first: Cost, second: Cost) -> Cost:
    total = {f.name: getattr(first, f.name) + getattr(second, f.name) for f in fields(Cost)}
    total["peak_memory_bytes"] = max(first.peak_memory_bytes, second.peak_memory_bytes)
    return Cost(**total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, sparsities="0.3,0.5,0.7", variants=",".join(VARIANTS))
    parser.add_argument("--baseline-epochs", type=int, help="fine-tuning epochs of magnitude-ft (default: E)")
    parser.add_argument("--out-dir", type=Path, help="results.jsonl and report.md (default runs/bip_filters)")
    args = parser.parse_args()
    check_variants(args, VARIANTS)
    torch.set_num_threads(args.threads)
    epochs = epochs_of(args)
    baseline_epochs = 1 if args.quick else args.baseline_epochs or epochs
    setup = pretrained(args)
    out_dir = output_folder("bip_filters", args)
    settings = {"epochs": epochs, "baseline_epochs": baseline_epochs, "train_size": len(setup.dataset.train)}

    def run(variant: str, sparsity: float, seed: int) -> dict[str, Any]:
        data = train_loader(setup, seed, args.device)
        if variant == "bip":
            return run_once(setup, lambda model: prunekit.prune(model, "bip", sparsity, data, seed=seed,
                                                                epochs=epochs, **FILTERS), args.device)
        return run_once(setup, lambda model: magnitude_then_finetune(model, sparsity, data, baseline_epochs, seed,
                                                                     args.device), args.device)

    rows = sweep(args, out_dir, settings, run)
    finish(args, out_dir, setup, rows, f"filter-wise pruning of ResNet-20 / CIFAR-10 (fraction of filters), "
                                       f"BiP {epochs} epochs, magnitude + {baseline_epochs} epochs of fine-tuning")


if __name__ == "__main__":
    main()
