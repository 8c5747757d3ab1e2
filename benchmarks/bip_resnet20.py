"""BiP reproduction 2, BiP side: ResNet-20 on CIFAR-10 from the shared checkpoint, BiP at 80% and 95%.

    .venv/bin/python benchmarks/bip_resnet20.py [--budget short|full] [--quick] [--sparsities 0.8,0.95]
        [--seeds 0] [--variants paper] [--device cpu] [--threads 2] [--out-dir runs/bip_resnet20]

BiP prunes the WoodFisher ResNet-20 checkpoint (91.43%, ../shared/checkpoints/woodfisher) with one
global unstructured ranking over every convolution and the final linear layer, as the official code
does, and the official CIFAR-10 config otherwise: batch 128 with random crop and flip, weights SGD
lr 0.1 cosine, scores SGD lr 0.1 step, momentum 0.9, weight decay 1e-4, 1/γ = 1e-4, no fine-tuning.
Budgets: `short` is 3 epochs (two passes over the training set each, one per level), sized for the
2-core development machine; `full` is the paper's 100 epochs, for a GPU (`--device cuda`). The IMP
and OMP side of this reproduction is run at the same budget by the lead's combined suite.

Reported per variant and sparsity: test accuracy, and what producing the sparse model cost (seconds,
gradient evaluations = examples through a backward pass, also in training-set epochs). The dense
checkpoint's training is not counted. `--quick` is a smoke run: 1,024 training and 1,000 test images,
1 epoch, seed 0. `bip_filters.py` (reproduction 3) reuses the helpers here.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

import prunekit
from prunekit import workflow
from prunekit.methods.bip import IMPLICIT_GRADIENTS
from prunekit.tables import render_table
from prunekit.training import evaluate

CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "woodfisher" / "resnet20_cifar10.pth.tar"
BUDGETS = {"short": 3, "full": 100}  # BiP epochs; full = the official configs/CIFAR10/bip.yml
BATCH, EVAL_BATCH = 128, 1000
QUICK_SIZES = {"train_size": 1024, "test_size": 1000}


# ---------------------------------------------------------------- shared with bip_filters.py

def common_arguments(parser: argparse.ArgumentParser, sparsities: str, variants: str) -> None:
    """Flags of both scripts; `variants` is the default list of the comparison's columns."""
    parser.add_argument("--quick", action="store_true", help="smoke run (see the module docstring)")
    parser.add_argument("--budget", choices=BUDGETS, default="short", help="short: 3 epochs (CPU); full: 100 (GPU)")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs")
    parser.add_argument("--sparsities", default=sparsities)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=variants)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="folder holding CIFAR10/ (default: $PRUNEKIT_DATA)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)


def check_variants(args, known: tuple[str, ...]) -> None:
    """Refuse an unknown variant before hours of runs, not after."""
    unknown = [v for v in args.variants.split(",") if v not in known]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(known)}")


def pretrained(args) -> workflow.Setup:
    """The checkpoint's ResNet-20 and CIFAR-10 with the normalisation it was trained with."""
    sizes = QUICK_SIZES if args.quick else {}
    setup = workflow.setup("resnet20", "cifar10", args.data_dir, str(args.checkpoint), **sizes)
    setup.model.to(args.device)
    return setup


def epochs_of(args) -> int:
    return 1 if args.quick else args.epochs or BUDGETS[args.budget]


def run_once(setup: workflow.Setup, prune_copy: Callable[[torch.nn.Module], Any], device: str) -> dict[str, Any]:
    """Prune a copy of the pretrained model; its test accuracy and the cost of producing it."""
    model = copy.deepcopy(setup.model)
    result = prune_copy(model)
    test = setup.loader("test", EVAL_BATCH, device=device)
    return {"sparsity": result.sparsity, "accuracy": evaluate(model, test, device)["accuracy"],
            "seconds": result.cost.seconds, "backward_examples": result.cost.backward_examples,
            "forward_examples": result.cost.forward_examples,
            "history": [{k: v for k, v in e.items() if k != "cost"} for e in result.history]}


def train_loader(setup: workflow.Setup, seed: int, device: str):
    """Training batches with the official loaders' augmentation, shuffled by the seed."""
    return setup.loader("train", BATCH, shuffle=True, augment=True, seed=seed, device=device)


def sweep(args, out_dir: Path, settings: dict[str, Any], run: Callable[[str, float, int], dict[str, Any]]
          ) -> list[dict[str, Any]]:
    """Every (variant, sparsity, seed) not yet in out_dir/results.jsonl with these settings; all rows."""
    results = out_dir / "results.jsonl"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[(row["variant"], row["requested"], row["seed"], json.dumps(row["settings"], sort_keys=True))] = row
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for variant in args.variants.split(","):
            for sparsity in map(float, args.sparsities.split(",")):
                key = (variant, sparsity, seed, json.dumps(settings, sort_keys=True))
                if key not in done:
                    row = {"variant": variant, "requested": sparsity, "seed": seed, "settings": settings,
                           **run(variant, sparsity, seed)}
                    with results.open("a") as out:
                        out.write(json.dumps(row) + "\n")
                    print(f"{variant} s={row['sparsity']:.4f} seed {seed}: {100 * row['accuracy']:.2f}% in "
                          f"{row['seconds']:.0f} s, {row['backward_examples']} backward examples", flush=True)
                    done[key] = row
                rows.append(done[key])
    return rows


def report(rows: list[dict[str, Any]], train_size: int, dense_accuracy: float, header: str) -> str:
    """Markdown tables per sparsity and variant: accuracy, seconds, gradient evaluations in epochs."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sparsities = sorted({r["requested"] for r in rows})

    def cell(values: list[float], digits: int) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    def table(value: Callable[[dict[str, Any]], float], digits: int) -> str:
        return render_table(["sparsity", *variants], [
            [f"{s:g}", *(cell([value(r) for r in rows if r["variant"] == v and r["requested"] == s], digits)
                         for v in variants)] for s in sparsities])

    return "\n\n".join([
        f"{header}; dense {100 * dense_accuracy:.2f}%",
        "test accuracy (%)", table(lambda r: 100 * r["accuracy"], 2),
        "wall-clock to produce the sparse model (s)", table(lambda r: r["seconds"], 0),
        f"gradient evaluations (backward examples / {train_size})", table(lambda r: r["backward_examples"] / train_size, 2),
    ])


def finish(args, out_dir: Path, setup: workflow.Setup, rows: list[dict[str, Any]], header: str) -> None:
    dense = evaluate(setup.model, setup.loader("test", EVAL_BATCH, device=args.device), args.device)["accuracy"]
    text = report(rows, len(setup.dataset.train), dense,
                  f"{header}; torch {torch.__version__}, {args.device}, {args.threads} threads, {platform.machine()}")
    (out_dir / "report.md").write_text(text + "\n")
    print(text)


def output_folder(name: str, args) -> Path:
    out_dir = args.out_dir or Path("runs") / (name + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


# ---------------------------------------------------------------- reproduction 2: BiP

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, sparsities="0.8,0.95", variants="paper")
    parser.add_argument("--out-dir", type=Path, help="results.jsonl and report.md (default runs/bip_resnet20)")
    args = parser.parse_args()
    check_variants(args, IMPLICIT_GRADIENTS)
    torch.set_num_threads(args.threads)
    epochs = epochs_of(args)
    setup = pretrained(args)
    out_dir = output_folder("bip_resnet20", args)
    settings = {"epochs": epochs, "train_size": len(setup.dataset.train), "batch": BATCH}

    def run(variant: str, sparsity: float, seed: int) -> dict[str, Any]:
        data = train_loader(setup, seed, args.device)
        return run_once(setup, lambda model: prunekit.prune(
            model, "bip", sparsity, data, seed=seed, epochs=epochs, implicit_gradient=variant), args.device)

    rows = sweep(args, out_dir, settings, run)
    finish(args, out_dir, setup, rows, f"BiP on ResNet-20 / CIFAR-10, {epochs} epochs, global unstructured")


if __name__ == "__main__":
    main()
