"""`prunekit methods | train | prune | eval | bench | report | demo`; flags are generated from the dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

import torch

from . import hparams as hparams_lib
from .api import DEFAULT_SPARSITY
from .budgets import Budget, check_sparsity
from .errors import PrunekitError
from .methods import all_methods, get_method, method_fields
from .objectives import OBJECTIVES, as_objective
from .tables import render_table
from .training import TrainConfig
from .version import __version__
from .workflow import DEVICES


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prunekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")  # each command's parser is a Parser too
    _methods_command(commands)
    _train_command(commands)
    _prune_command(commands)
    _eval_command(commands)
    _bench_command(commands)
    _report_command(commands)
    _demo_command(commands)
    _export_command(commands)
    return parser


class StatedDefaultsFormatter(argparse.HelpFormatter):
    """Every optional flag's help states its default as `(default: X)`.

    A help text that says it itself (where the value needs words, e.g. "(default: every prunable tensor)")
    is left as written; otherwise the flag's default value is appended, `off` for a switch.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default: " in text or action.default is argparse.SUPPRESS or action.required or not action.option_strings:
            return text
        shown = "none" if action.default is None else "off" if action.default is False else action.default
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with prunekit's conventions: every flag's default stated, and a usage error on one line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, formatter_class=StatedDefaultsFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _version() -> str:
    return f"prunekit {__version__} (torch {torch.__version__})"


# ---------------------------------------------------------------- commands

def _methods_command(commands) -> None:
    parser = commands.add_parser("methods", help="list the pruning methods, or one method's hyperparameters")
    parser.add_argument("name", nargs="?", help="show this method's hyperparameters")
    parser.set_defaults(run=_run_methods)


def _run_methods(args) -> None:
    if args.name:
        method = get_method(args.name)
        print(f"{method.name}: {method.summary}" + (" (needs data)" if method.needs_data else ""))
        rows = [[f.name, f.default, "" if f.check is None else f.check.requirement, f.help]
                for f in method_fields(method)]
        print(render_table(["hyperparameter", "default", "takes", "help"], rows) if rows else "no hyperparameters")
        return
    rows = [[m.name, "yes" if m.needs_data else "no", m.summary] for m in all_methods()]
    print(render_table(["method", "needs data", "what it does"], rows))


def _train_command(commands) -> None:
    parser = commands.add_parser("train", help="train a dense model from the zoo", description=(
        "Train a zoo model on a dataset and save its weights (safetensors)."))
    _add_model_and_data_flags(parser, checkpoint_help="start from these weights instead of a fresh model")
    _add_dataclass_flags(parser.add_argument_group("training"), TrainConfig)
    parser.add_argument("--seed", type=int, default=0, metavar="INT",
                        help="seed of the model's initialisation, the shuffling and training's randomness")
    parser.add_argument("--batch-size", type=int, default=128, metavar="INT",
                        help="examples per training batch")
    parser.add_argument("--out", required=True, help="where to write the trained weights (.safetensors)")
    parser.add_argument("--log", help="JSON-lines log of the epochs")
    parser.add_argument("--resume", help="checkpoint file for exact resume (created if missing)")
    parser.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from . import workflow

    config = hparams_lib.build(TrainConfig, _dataclass_values(args, TrainConfig), "training")
    for flag, value, check in (("--seed", args.seed, hparams_lib.integer(0)),
                               ("--batch-size", args.batch_size, hparams_lib.integer(1))):
        if not check(value):
            raise PrunekitError(f"{flag} {value} is invalid: set it to {check.requirement}")
    _check_output_path(args.out)
    setup = workflow.setup(args.model, args.dataset, args.data_dir, args.checkpoint, seed=args.seed,
                           device=args.device)
    history = workflow.train(setup, config, batch_size=args.batch_size, seed=args.seed, log_path=args.log,
                             checkpoint_path=args.resume)
    workflow.save_weights(setup, args.out, {"training": hparams_lib.to_dict(config), "seed": args.seed,
                                            "batch_size": args.batch_size, "history": history[-1:]})
    print(f"trained {args.model} on {args.dataset}: test accuracy {history[-1].get('eval_accuracy', float('nan')):.4f}; "
          f"weights written to {args.out}")


def _prune_command(commands) -> None:
    parser = commands.add_parser("prune", help="prune a model with any registered method", description=(
        "Prune a model and write the pruned weights (and optionally the masks). Method hyperparameters "
        "are flags; `prunekit methods NAME` lists one method's."))
    _add_model_and_data_flags(parser, checkpoint_help="dense weights to prune", dataset_required=False)
    parser.add_argument("--method", default="magnitude", help="pruning method (see `prunekit methods`)")
    parser.add_argument("--sparsity", type=float, help="fraction of zeros over the prunable weights "
                        f"(default: {DEFAULT_SPARSITY}; with --structure nm, 1 - N/M)")
    parser.add_argument("--include", action="append", help="prune only tensors whose name matches this regex; "
                        "repeatable (default: every prunable tensor)")
    parser.add_argument("--exclude", action="append", help="do not prune tensors whose name matches this regex; "
                        "repeatable")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the data given to the method")
    _add_dataclass_flags(parser.add_argument_group("budget"), Budget)
    parser.add_argument("--loss", help=f"what the data-driven methods minimise: {', '.join(OBJECTIVES)} (distill: "
                        "match the dense model's outputs, no labels needed) (default: inferred from the data: "
                        "labels in a mapping batch → the model's own loss, class targets → cross-entropy)")
    _add_method_flags(parser.add_argument_group("method hyperparameters (each applies to the methods named)"))
    parser.add_argument("--out", help="write the pruned weights here, .safetensors; a Hugging Face model is "
                        "written as a model folder (save_pretrained) unless the name ends in .safetensors "
                        "(default: not written)")
    parser.add_argument("--masks-out", help="write the masks here, .safetensors with metadata (default: not written)")
    parser.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    parser.add_argument("--test-size", type=int, help="evaluate on a fixed random subset of N test examples "
                        "(default: the whole test set)")
    parser.set_defaults(run=_run_prune)


def _run_prune(args) -> None:
    from . import workflow
    from .api import prune
    from .data.text import TextDataset
    from .masks import save_masks

    method = get_method(args.method)
    if method.needs_data and args.dataset is None:
        raise PrunekitError(f"method {method.name!r} needs data: pass --dataset (or a method that needs none, "
                            "e.g. --method magnitude)")
    method_values = {f.name: getattr(args, f.name) for f in method_fields(method) if hasattr(args, f.name)}
    _reject_foreign_method_flags(args, method)
    budget = hparams_lib.build(Budget, _dataclass_values(args, Budget), "budget")
    hparams_lib.build(method.hparams, method_values, f"method {method.name!r}")  # validate before loading
    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    for path in (args.out, args.masks_out):
        _check_output_path(path)
    setup = workflow.setup(args.model, args.dataset, args.data_dir, args.checkpoint, seed=args.seed,
                           device=args.device, test_size=args.test_size)
    evaluates = not args.no_eval and setup.dataset is not None
    if evaluates and args.loss is None and isinstance(setup.dataset, TextDataset):
        raise PrunekitError("a text model is evaluated under its loss: pass --loss (e.g. --loss distill: the cosine "
                            "similarity to the dense model), or --no-eval")
    # Made from the dense model, before pruning: distill's reference; the same objective then evaluates.
    objective = None if args.loss is None else as_objective(args.loss, setup.model)
    data = workflow.calibration_loader(setup, args.batch_size, args.seed) if method.needs_data else None
    result = prune(setup.model, args.method, args.sparsity, data, budget=budget, include=args.include,
                   exclude=args.exclude, seed=args.seed, loss=objective, **method_values)
    print(result)
    if evaluates:
        print(_metrics_line(workflow.evaluate(setup, result.objective or objective)))
    if args.masks_out:
        save_masks(setup.model, args.masks_out, result.metadata())
        print(f"masks written to {args.masks_out}")
    if args.out:
        workflow.save_weights(setup, args.out, {"pruning": result.metadata(), "sparsity": result.sparsity})
        print(f"pruned weights written to {args.out}")


def _metrics_line(metrics: dict[str, float]) -> str:
    """`test accuracy 0.9000, loss 0.3000` (or cosine, perplexity, ...: what the objective measures)."""
    names = sorted((name for name in metrics if name != "examples"), key=lambda name: name != "accuracy")
    return "test " + ", ".join(f"{name} {metrics[name]:.4f}" for name in names)


def _eval_command(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a model (optionally with masks) on a test set")
    _add_model_and_data_flags(parser, checkpoint_help="weights to evaluate")
    parser.add_argument("--masks", help="attach these masks before evaluating")
    parser.add_argument("--test-size", type=int, help="evaluate on a fixed random subset of N test examples "
                        "(default: the whole test set)")
    parser.set_defaults(run=_run_eval)


def _run_eval(args) -> None:
    from . import workflow
    from .masks import load_masks, sparsity_report

    setup = workflow.setup(args.model, args.dataset, args.data_dir, args.checkpoint, test_size=args.test_size,
                           device=args.device)
    if args.masks:
        load_masks(setup.model, args.masks)
    metrics = workflow.evaluate(setup)
    print(sparsity_report(setup.model))
    print(f"test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} on {metrics['examples']} examples")


DEFAULT_DB = "runs/prunekit.db"


def _bench_command(commands) -> None:
    parser = commands.add_parser("bench", help="run a comparison suite (resumable; results in SQLite)", description=(
        "Run every run of a suite that the database does not hold yet: same model, data and budget for every "
        "method. Interrupt it at any time; the same command resumes. Several bench processes may share a database."))
    parser.add_argument("--suite", help="a shipped suite's name (see --list) or the path of a suite .yaml file")
    parser.add_argument("--list", action="store_true", help="list the shipped suites and their variants, and exit")
    parser.add_argument("--variant", help="one of the suite's named `variants:` (see --list); its runs are stored "
                                          "as suite NAME:VARIANT")
    parser.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the suite's seeds")
    parser.add_argument("--quick", action="store_true", help="one seed, and the suite's `quick:` settings")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"runs database (default: {DEFAULT_DB}); masks and cached "
                                                          "dense models are kept beside it")
    parser.add_argument("--data-dir", help="folder holding the datasets (default: $PRUNEKIT_DATA)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where models train and run (default: cpu); "
                        "a suite marked `device: cuda` needs --device cuda, unless --quick")
    parser.add_argument("--isolate", action="store_true", help="run every run in a fresh process, so that its peak "
                        "memory is its own (slower: each loads the data again)")
    parser.set_defaults(run=_run_bench)


def _run_bench(args) -> None:
    from .bench import list_suites, load_suite

    if args.list:
        rows = [[name, ", ".join(variants) or "—", description] for name, description, variants in list_suites()]
        print(render_table(["suite", "variants (--variant)", "what it compares"], rows))
        return
    if not args.suite:
        raise PrunekitError("name a suite: prunekit bench --suite NAME (see `prunekit bench --list`)")
    suite = load_suite(args.suite, variant=args.variant, quick=args.quick, seeds=args.seeds, data_dir=args.data_dir)
    _fail_on_failed_runs(_bench(suite, args.db, args.data_dir, args.device, args.isolate), args.db)


def _bench(suite, db: str, data_dir: str | None, device: str = "cpu", isolate: bool = False):
    """Run the suite on `device` and print its table; returns the run summary."""
    from .bench import Store, run_suite
    from .bench.report import terminal_summary

    summary = run_suite(suite, db, device=device, data_dir=data_dir, isolate=isolate)
    with Store(db) as store:
        print(terminal_summary(store, suite.stored_name, summary.plan.setting))
    print(summary)
    return summary


def _fail_on_failed_runs(summary, db: str) -> None:
    if summary.failures:
        raise PrunekitError(f"{len(summary.failures)} run(s) of suite {summary.plan.suite.name} failed, first: "
                            f"{summary.failures[0]}; `prunekit report --db {db}` lists them with their errors")


def _report_command(commands) -> None:
    from .bench.report import FORMATS

    parser = commands.add_parser("report", help="write a report of the bench runs (markdown + plots, or CSV)")
    parser.add_argument("--db", default=DEFAULT_DB, help="runs database")
    parser.add_argument("--suite", help="only this suite (default: every suite in the database)")
    parser.add_argument("--out", default="report", help="folder to write into")
    parser.add_argument("--format", choices=FORMATS, default="markdown",
                        help="markdown (report.md with PNG plots) or csv (results.csv, one row per result)")
    parser.set_defaults(run=_run_report)


def _run_report(args) -> None:
    _report(args.db, args.out, args.suite, args.format)


def _report(db: str, out: str, suite: str | None, fmt: str) -> None:
    from .bench import write_report

    written = write_report(db, out, suite, fmt)
    print(f"report written: {', '.join(str(path) for path in written)}")


def _demo_command(commands) -> None:
    parser = commands.add_parser("demo", help="bench every method on digits (offline), then write the report",
                                 description="`prunekit bench --suite demo`, then `prunekit report --suite demo`.")
    parser.add_argument("--db", default=DEFAULT_DB, help="runs database")
    parser.add_argument("--out", default="report", help="report folder")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    from .bench import load_suite

    summary = _bench(load_suite("demo"), args.db, None)
    _report(args.db, args.out, "demo", "markdown")  # failed runs are listed in it
    _fail_on_failed_runs(summary, args.db)


def _export_command(commands) -> None:
    parser = commands.add_parser("export", help="write a pruned model as a compact model, a sparse weight file or "
                                 "ONNX; print its size and latency against the dense model", description=(
        "compact: the pruned channels removed (.safetensors weights, or .onnx); sparse: zeros left out of the file "
        "(.safetensors, loads into the dense model bit for bit; latency with CSR linear layers where measured "
        "faster); onnx: the model as ONNX (.onnx), checked in onnxruntime (pip install 'prunekit[onnx]')."))
    parser.add_argument("--model", required=True, help="zoo model name or a Hugging Face model folder")
    parser.add_argument("--checkpoint", help="the pruned weights (.safetensors or a torch file; a sparse file too) "
                        "(default: a Hugging Face folder's own weights; a zoo model needs one)")
    parser.add_argument("--format", required=True, help="what to write: compact, sparse or onnx")
    parser.add_argument("--out", required=True, help="the file to write: .safetensors (compact, sparse) or .onnx "
                        "(onnx, compact)")
    parser.add_argument("--dataset", help="examples to check and time the export on (default: none; a zoo model "
                        "needs one, a Hugging Face model gets random tokens)")
    parser.add_argument("--data-dir", help="folder holding the datasets (default: $PRUNEKIT_DATA)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per timed call")
    parser.add_argument("--threads", type=int, help="CPU threads for the timing (default: torch's default)")
    parser.set_defaults(run=_run_export)


def _run_export(args) -> None:
    from .export.command import ExportRequest, run_export

    print(run_export(ExportRequest(args.model, args.checkpoint, args.format, args.out, args.dataset, args.data_dir,
                                   args.batch_size, args.threads)))


# ---------------------------------------------------------------- flag generation

def _add_model_and_data_flags(parser, checkpoint_help: str, dataset_required: bool = True) -> None:
    parser.add_argument("--model", required=True, help="zoo model name (mlpnet, lenet300, lenet5, resnet20, ...) "
                        "or a Hugging Face model folder (config.json + model.safetensors, as save_pretrained writes)")
    parser.add_argument("--dataset", required=dataset_required, help="mnist, fashion-mnist, cifar10, cifar100, digits, "
                        "synthetic" + ("" if dataset_required else " (default: none; zoo models and methods that "
                                       "need data need one)"))
    parser.add_argument("--data-dir", help="folder holding the datasets (default: $PRUNEKIT_DATA)")
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the model trains and runs")


def _add_dataclass_flags(group, cls: type) -> None:
    """One flag per field; values stay strings here and are parsed by hparams.build like YAML."""
    for info in hparams_lib.describe(cls):
        group.add_argument(info.flag, dest=info.name, metavar=_type_name(info.type).upper(),
                           default=argparse.SUPPRESS, help=f"{_help_with_range(info)} (default: {info.default})")


def _help_with_range(info: hparams_lib.FieldInfo) -> str:
    """The help text and, where the setting declares one, the values it takes (its check's requirement)."""
    return info.help if info.check is None else f"{info.help.rstrip('.')}; {info.check.requirement}"


def _add_method_flags(group) -> None:
    """Every method's hyperparameters; a name shared by several methods is one flag.

    Methods whose setting has the same help and default are named together, so a training setting
    shared by a dozen methods reads once.
    """
    owners: dict[str, dict[tuple[str, str], list[str]]] = {}
    types: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for method in all_methods():
        for info in method_fields(method):
            flags[info.name] = info.flag
            owners.setdefault(info.name, {}).setdefault((_help_with_range(info), str(info.default)), []).append(
                method.name)
            types[info.name] = info.type
    for name, uses in owners.items():
        text = "; ".join(f"{', '.join(methods)}: {h} (default: {d})" for (h, d), methods in uses.items())
        group.add_argument(flags[name], dest=name, metavar=_type_name(types[name]).upper(),
                           default=argparse.SUPPRESS, help=text)


def _dataclass_values(args, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _reject_foreign_method_flags(args, method) -> None:
    own = {f.name for f in method_fields(method)}
    for other in all_methods():
        for field in method_fields(other):
            if field.name not in own and hasattr(args, field.name):
                raise PrunekitError(f"--{field.name.replace('_', '-')} is a hyperparameter of {other.name}, "
                                    f"not of {method.name}; see `prunekit methods {method.name}`")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _check_output_path(path: str | None) -> None:
    """Fail before the work, not after it, when the output cannot be written."""
    if path is None:
        return
    from pathlib import Path

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise PrunekitError(f"cannot write {path}: folder {parent} does not exist")


if __name__ == "__main__":
    sys.exit(main())
