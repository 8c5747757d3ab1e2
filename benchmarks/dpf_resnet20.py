"""DPF reproduction 2: ResNet-20 on CIFAR-10 at 90% sparsity, dense vs DPF vs GMP.

    .venv/bin/python benchmarks/dpf_resnet20.py [--quick] [--epochs 5] [--seeds 0] [--variants dense,dpf,gmp]
    .venv/bin/python benchmarks/dpf_resnet20.py --recipe paper --device cuda --seeds 0,1,2   # GPU only

ResNet-20 with the parameter-free shortcuts of He et al. (option A, 0.27M weights, the model of
Lin et al. 2020), global unstructured magnitude budget over every conv/linear weight.

- `--recipe cpu` (default): a short budget for 2 CPU cores (one epoch is about a minute there):
  cosine LR from 0.1, weight decay 1e-4, batch 128, the DPF/GMP schedule ending at 75% of it.
  It shows the methods run and how they rank early on; it cannot reach the paper's accuracy.
- `--recipe paper`: the paper's CIFAR recipe (research notes §3.3): 300 epochs, batch 128, SGD
  with Nesterov momentum 0.9, lr 0.2 decayed ×0.1 at epochs 150 and 225, weight decay 1e-4, mask
  update every 16 steps, cubic schedule ending at the second LR milestone (75%). It is for a GPU
  (days on 2 CPU cores) and is refused on the CPU.
"""
from __future__ import annotations

import argparse
import platform
from dataclasses import asdict, replace

import torch
from dpf_fashion_cifar import add_common_arguments, log_run, report, run_variant, warm_up

from prunekit.data import load_dataset
from prunekit.training import TrainConfig

RECIPES = {
    "cpu": TrainConfig(epochs=5, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine"),
    "paper": TrainConfig(epochs=300, batch_size=128, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4,
                         lr_schedule="step", lr_milestones=(0.5, 0.75), lr_gamma=0.1),
}
MODEL_OPTIONS = {"shortcut": "identity"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch on 1024 training and 1000 test images")
    parser.add_argument("--recipe", choices=RECIPES, default="cpu")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--variants", default="dense,dpf,gmp", help="any of dense, dpf, gmp, oneshot-ft, dpf-freeze")
    parser.add_argument("--sparsity", type=float, default=0.9)
    add_common_arguments(parser, seeds="0")
    args = parser.parse_args()
    if args.recipe == "paper" and not args.device.startswith("cuda"):
        parser.error("the paper recipe (300 epochs of ResNet-20) is GPU-only: pass --device cuda")
    if args.quick:
        args.epochs, args.train_size, args.test_size = 1, 1024, 1000
    recipe = RECIPES[args.recipe]
    if args.epochs is not None:
        recipe = replace(recipe, epochs=args.epochs)
    torch.set_num_threads(args.threads)
    warm_up()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}, device {args.device}, "
          f"recipe {args.recipe}: {asdict(recipe)}")
    dataset = load_dataset("cifar10", args.data_dir, train_size=args.train_size,
                           test_size=args.test_size)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for variant in args.variants.split(","):
            rows.append(run_variant(dataset, "resnet20", variant, args.sparsity, seed, recipe, args.device,
                                    MODEL_OPTIONS))
            log_run(rows[-1], args.out)
    print()
    print(report(rows))


if __name__ == "__main__":
    main()
