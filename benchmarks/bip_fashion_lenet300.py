"""BiP reproduction 1: LeNet-300-100 on Fashion-MNIST, every method at 80-99% sparsity, accuracy and cost.

    .venv/bin/python benchmarks/bip_fashion_lenet300.py [--quick] [--methods bip-paper,imp,...]
        [--sparsities 0.8,0.9,0.95,0.98,0.99] [--seeds 0,1,2] [--dense-epochs 20] [--epochs 20]
        [--rewind-epoch 1] [--threads 2] [--out-dir runs/bip_fashion_lenet300]

The setting of research notes §5.3 and issue 5. Per seed, prunekit trains a dense LeNet-300-100
(SGD momentum 0.9, lr 0.05 cosine, weight decay 1e-4, batch 128) and caches it in the output folder,
with its weights after `--rewind-epoch` epochs (the rewind point of IMP and OMP). Then every method
prunes to every sparsity (global unstructured over the three weight matrices; biases are not pruned),
with the same training recipe for `--epochs` E:

- bip-paper, bip-code, bip-off: BiP from the dense model with each implicit-gradient variant, E epochs;
- imp: from the dense model, 20% of the survivors per round, survivors rewound to the early weights,
  E epochs per round. One run per sparsity (its last round stops exactly at it), so every method is
  compared at the same sparsity; each run also records every round (`rounds` in the results);
- omp: one-shot magnitude on the dense model, rewound to the early weights, then E epochs;
- hydra: scores for E epochs with the weights frozen, then E epochs of fine-tuning;
- snip, grasp, synflow: at the seed's initialisation (the one the dense model was trained from), then
  E epochs of training of the sparse network.

Cost is what prune() measured to produce the sparse model: wall-clock seconds and gradient
evaluations (examples through a backward pass), the latter also as dense epochs (÷ training-set
size). The dense training is shared by BiP, IMP, OMP and Hydra and is not counted, as in the paper's
timing figure; the pruning-at-initialisation methods' cost includes their training.
Goals (issue 5): BiP within 0.3 points of IMP (or above) at every sparsity, at least 3x cheaper than
IMP at >= 0.9, and above OMP and Hydra at >= 0.95.

Methods that are not registered in this prunekit (bip and hydra land in their own change) are
skipped with a message. `--quick` is a smoke run: 2,000 training and 1,000 test images, 2 dense
epochs, E = 1, seed 0, sparsities 0.8 and 0.95, SynFlow with 10 iterations.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit.methods import training_hparams
from prunekit import hparams as hparams_lib
from prunekit.checkpoints import load_state_dict_into, read_state_dict, save_model
from prunekit.data import Dataset, Loader, load_dataset
from prunekit.errors import PrunekitError
from prunekit.methods import get_method
from prunekit.models import create_model_for
from prunekit.tables import render_table
from prunekit.training import Callback, TrainConfig, Trainer, evaluate

MODEL, DATASET = "lenet300", "fashion-mnist"
RECIPE = TrainConfig(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine")
EVAL_BATCH = 1000


@dataclass(frozen=True)
class Variant:
    """A column of the comparison: a registered method, where it starts, and its own hyperparameters."""

    method: str
    start: str  # "dense": the trained model; "init": its initialisation
    hparams: dict[str, Any] = field(default_factory=dict)


def variants(epochs: int, rewind_weights: str | None, synflow_iterations: int) -> dict[str, Variant]:
    """Every column; `rewind_weights` is the file of the dense model's early weights (None to check the settings)."""
    return {
        "bip-paper": Variant("bip", "dense", {"implicit_gradient": "paper"}),
        "bip-code": Variant("bip", "dense", {"implicit_gradient": "code"}),
        "bip-off": Variant("bip", "dense", {"implicit_gradient": "off"}),
        "imp": Variant("imp", "dense", {"rate": 0.2, "rewind_weights": rewind_weights}),
        "omp": Variant("omp", "dense", {"rewind_weights": rewind_weights}),
        "hydra": Variant("hydra", "dense", {"finetune_epochs": epochs}),
        "snip": Variant("snip", "init"),
        "grasp": Variant("grasp", "init"),
        "synflow": Variant("synflow", "init", {"iterations": synflow_iterations}),
    }


# ---------------------------------------------------------------- the dense model and its rewind point

def initial_model(dataset: Dataset, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model_for(MODEL, dataset.num_classes, dataset.input_shape)


class _SaveAfterEpoch(Callback):
    def __init__(self, epoch: int, path: Path, metadata: dict[str, Any]):
        self.epoch, self.path, self.metadata = epoch, path, metadata

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.epoch + 1 == self.epoch:
            save_model(trainer.model, self.path, self.metadata)


def dense_model(dataset: Dataset, seed: int, recipe: TrainConfig, rewind_epoch: int, out_dir: Path,
                test: Loader) -> tuple[nn.Module, Path, float]:
    """The trained dense model of this seed and the file of its early weights, from the cache when it matches."""
    path = out_dir / f"dense_seed{seed}.safetensors"
    early = out_dir / f"dense_seed{seed}_epoch{rewind_epoch}.safetensors"
    recipe = replace(recipe, seed=seed)
    wanted = {"recipe": asdict(recipe), "train_size": len(dataset.train), "rewind_epoch": rewind_epoch}
    model = initial_model(dataset, seed)
    cached, metadata = read_state_dict(path) if path.exists() and early.exists() else ({}, {})
    if metadata.get("settings") == wanted:
        load_state_dict_into(model, cached)
        return model, early, evaluate(model, test)["accuracy"]
    print(f"training the dense model of seed {seed} ({recipe.epochs} epochs) ...", flush=True)
    if rewind_epoch == 0:
        save_model(model, early, {"settings": wanted})
    train = Loader.for_dataset(dataset, "train", recipe.batch_size, seed=seed)
    Trainer(model, train, recipe, callbacks=[_SaveAfterEpoch(rewind_epoch, early, {"settings": wanted})],
            progress=False).fit()
    save_model(model, path, {"settings": wanted})
    return model, early, evaluate(model, test)["accuracy"]


# ---------------------------------------------------------------- one run

def run(variant: Variant, start: nn.Module, train: Loader, test: Loader, sparsity: float, seed: int,
        recipe: TrainConfig) -> dict[str, Any]:
    """Prune a copy of `start` with the variant; accuracy on the test set and what producing the model cost."""
    model = copy.deepcopy(start)
    rounds: list[dict[str, Any]] = []

    def every_round(current: nn.Module, event: dict[str, Any]) -> None:
        rounds.append({"round": event["round"], "sparsity": event["sparsity"],
                       "accuracy": evaluate(current, test)["accuracy"], "seconds": event["cost"]["seconds"],
                       "backward_examples": event["cost"]["backward_examples"]})

    training = training_hparams(recipe)
    result = prunekit.prune(model, variant.method, sparsity, train, seed=seed,
                            observer=every_round if variant.method == "imp" else None,
                            **training, **variant.hparams)
    return {"sparsity": result.sparsity, "accuracy": evaluate(model, test)["accuracy"],
            "seconds": result.cost.seconds, "backward_examples": result.cost.backward_examples,
            "forward_examples": result.cost.forward_examples, "rounds": rounds}


# ---------------------------------------------------------------- report

def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def report(rows: list[dict[str, Any]], train_size: int) -> str:
    """Markdown tables: accuracy, wall-clock and gradient evaluations per sparsity and method; the goals."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    sparsities = sorted({r["requested"] for r in rows})

    def runs(name: str, sparsity: float) -> list[dict[str, Any]]:
        return [r for r in rows if r["variant"] == name and r["requested"] == sparsity]

    def table(cell) -> str:
        return render_table(["sparsity", *names], [[f"{s:g}", *(cell(runs(n, s)) for n in names)] for s in sparsities])

    parts = ["test accuracy (%), mean ± std over seeds",
             table(lambda rs: _mean_std([r["accuracy"] for r in rs])),
             "wall-clock to produce the sparse model (s)",
             table(lambda rs: _mean_std([r["seconds"] for r in rs], 1.0, 1)),
             f"gradient evaluations to produce it, in dense epochs (backward examples / {train_size})",
             table(lambda rs: _mean_std([r["backward_examples"] / train_size for r in rs], 1.0, 1))]
    goals = _goals(runs, sparsities)
    if goals:
        parts += ["goals: BiP (paper IG) vs IMP, OMP and Hydra", goals]
    return "\n\n".join(parts)


def _goals(runs, sparsities: list[float]) -> str:
    def mean(name: str, sparsity: float, key: str) -> float | None:
        values = [r[key] for r in runs(name, sparsity)]
        return statistics.mean(values) if values else None

    lines = []
    for s in sparsities:
        bip, imp = mean("bip-paper", s, "accuracy"), mean("imp", s, "accuracy")
        if bip is None or imp is None:
            continue
        speedup = mean("imp", s, "seconds") / mean("bip-paper", s, "seconds")
        gradients = mean("imp", s, "backward_examples") / mean("bip-paper", s, "backward_examples")
        others = [a for a in (mean("omp", s, "accuracy"), mean("hydra", s, "accuracy")) if a is not None]
        checks = [f"BiP - IMP {100 * (bip - imp):+.2f} pts ({'ok' if bip >= imp - 0.003 else 'MISSED'})",
                  f"IMP / BiP time {speedup:.1f}x" + (f" ({'ok' if speedup >= 3 else 'MISSED'})" if s >= 0.9 else "")
                  + f", gradient evaluations {gradients:.1f}x"]
        if others and s >= 0.95:
            margin = bip - max(others)
            checks.append(f"BiP - best of OMP/Hydra {100 * margin:+.2f} pts ({'ok' if margin > 0 else 'MISSED'})")
        lines.append(f"- {s:g}: " + "; ".join(checks))
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def _available(chosen: list[str], table: dict[str, Variant], recipe: TrainConfig) -> list[str]:
    """The chosen variants whose method is registered; their hyperparameters are checked before any work."""
    registered = set(prunekit.methods())
    kept = []
    for name in chosen:
        if name not in table:
            raise SystemExit(f"unknown method variant {name!r}; choose from {', '.join(table)}")
        variant = table[name]
        if variant.method not in registered:
            print(f"skipping {name}: method {variant.method!r} is not registered in this prunekit "
                  f"(registered: {', '.join(sorted(registered))})")
            continue
        training = training_hparams(recipe)
        try:
            hparams_lib.build(get_method(variant.method).hparams, {**training, **variant.hparams}, name)
        except PrunekitError as error:
            raise SystemExit(f"the settings of {name} do not fit method {variant.method!r}: {error}") from None
        kept.append(name)
    return kept


def _done(path: Path) -> dict[tuple, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["seed"], r["requested"], json.dumps(r["settings"], sort_keys=True)): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (see the module docstring)")
    parser.add_argument("--methods", default="bip-paper,bip-code,bip-off,imp,omp,hydra,snip,grasp,synflow")
    parser.add_argument("--sparsities", default="0.8,0.9,0.95,0.98,0.99")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dense-epochs", type=int, default=RECIPE.epochs, help="epochs of the dense training")
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs,
                        help="E: epochs of each method's training (per IMP round; each Hydra phase)")
    parser.add_argument("--rewind-epoch", type=int, default=1, help="IMP/OMP rewind point in the dense training")
    parser.add_argument("--synflow-iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="folder holding FashionMNIST/ (default: $PRUNEKIT_DATA)")
    parser.add_argument("--out-dir", type=Path, help="results.jsonl, the dense models and the report "
                        "(default runs/bip_fashion_lenet300, or ...-quick)")
    args = parser.parse_args()
    sizes: dict[str, int | None] = {"train_size": None, "test_size": None}
    if args.quick:
        args.sparsities, args.seeds, args.dense_epochs, args.epochs, args.synflow_iterations = "0.8,0.95", "0", 2, 1, 10
        sizes = {"train_size": 2000, "test_size": 1000}
    out_dir = args.out_dir or Path("runs") / ("bip_fashion_lenet300" + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    recipe = replace(RECIPE, epochs=args.epochs)
    dense_recipe = replace(RECIPE, epochs=args.dense_epochs)
    table = variants(args.epochs, None, args.synflow_iterations)
    chosen = _available(args.methods.split(","), table, recipe)
    dataset = load_dataset(DATASET, args.data_dir, **sizes)
    settings = {"epochs": args.epochs, "dense_epochs": args.dense_epochs, "rewind_epoch": args.rewind_epoch,
                "synflow_iterations": args.synflow_iterations, **sizes}
    results = out_dir / "results.jsonl"
    done = _done(results)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}; results in {results}")
    rows = []
    for seed in map(int, args.seeds.split(",")):
        test = Loader.for_dataset(dataset, "test", EVAL_BATCH)
        dense, early, dense_accuracy = dense_model(dataset, seed, dense_recipe, args.rewind_epoch, out_dir, test)
        print(f"seed {seed}: dense {100 * dense_accuracy:.2f}%", flush=True)
        table = variants(args.epochs, str(early), args.synflow_iterations)
        for name in chosen:
            for sparsity in map(float, args.sparsities.split(",")):
                key = (name, seed, sparsity, json.dumps(settings, sort_keys=True))
                if key in done:
                    rows.append(done[key])
                    continue
                variant = table[name]
                start = dense if variant.start == "dense" else initial_model(dataset, seed)
                train = Loader.for_dataset(dataset, "train", recipe.batch_size, seed=seed)
                row = {"variant": name, "method": variant.method, "seed": seed, "requested": sparsity,
                       "settings": settings, "dense_accuracy": dense_accuracy,
                       **run(variant, start, train, test, sparsity, seed, recipe)}
                rows.append(row)
                with results.open("a") as out:
                    out.write(json.dumps(row) + "\n")
                print(f"{name} s={row['sparsity']:.4f} seed {seed}: {100 * row['accuracy']:.2f}% in "
                      f"{row['seconds']:.1f} s, {row['backward_examples'] / len(dataset.train):.1f} dense epochs "
                      "of gradients", flush=True)
    text = report(rows, len(dataset.train))
    (out_dir / "report.md").write_text(text + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
