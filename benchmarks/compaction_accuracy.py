"""Top-1 of a pruned model, masked and compacted, on a real test set: compaction must not change a prediction.

    PRUNEKIT_DATA=../shared/datasets .venv/bin/python benchmarks/compaction_accuracy.py \
        [--checkpoint ../shared/checkpoints/woodfisher/resnet20_cifar10.pth.tar] [--fractions 0.3 0.5 0.7] \
        [--calibration 2000]

ResNet-20 from the checkpoint, magnitude pruning with structure="groups" and a uniform budget (that
fraction of every family of coupled channels, one shot, no fine-tuning), its batch-norm statistics
re-estimated on `--calibration` training images (the masked model's, as a pruned network needs), then
`prunekit.compact`. Printed per fraction: top-1 of the masked model before and after the
re-estimation and of the compact model on the whole CIFAR-10 test set, how many of the 10,000
predictions the masked and the compact model disagree on, and the compact model's parameters over
the dense one's.
"""
from __future__ import annotations

import argparse
import copy
import os
from itertools import islice

import torch

import prunekit
from prunekit import workflow
from prunekit.training import evaluate, reestimate_batch_norm

DEFAULT_CHECKPOINT = os.path.join(os.environ.get("PRUNEKIT_DATA", "."), "..", "checkpoints", "woodfisher",
                                  "resnet20_cifar10.pth.tar")


def predictions(model: torch.nn.Module, loader) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(inputs).argmax(1) for inputs, _ in loader])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--calibration", type=int, default=2000, help="training images for the batch-norm statistics")
    args = parser.parse_args()
    setup = workflow.setup("resnet20", "cifar10", checkpoint=args.checkpoint)
    test = setup.loader("test", 500)
    calibration = setup.loader("train", 500, shuffle=True, seed=0)
    dense = setup.model
    print(f"dense top-1 {top1(dense, test)}")
    print("| channels removed | masked top-1 | masked, BN re-estimated | compact top-1 | predictions that differ "
          "| params |")
    print("|---|---|---|---|---|---|")
    for fraction in args.fractions:
        masked = copy.deepcopy(dense)
        prunekit.prune(masked, "magnitude", fraction, structure="groups", budget="uniform")
        before = top1(masked, test)
        reestimate_batch_norm(masked, islice(calibration, args.calibration // 500))
        compacted = prunekit.compact(masked, torch.zeros(2, *setup.dataset.input_shape))
        differ = int((predictions(masked, test) != predictions(compacted, test)).sum())
        params = sum(p.numel() for p in compacted.parameters()) / sum(p.numel() for p in dense.parameters())
        print(f"| {fraction:.1f} | {before} | {top1(masked, test)} | {top1(compacted, test)} | {differ} | "
              f"{params:.3f} |", flush=True)


def top1(model: torch.nn.Module, loader) -> str:
    return f"{100 * evaluate(model, loader)['accuracy']:.2f}"


if __name__ == "__main__":
    main()
