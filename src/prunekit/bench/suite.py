"""Bench suites: YAML files naming a model, data, a dense start, methods, sparsities and seeds.

Everything in a suite is checked before any work, and every problem is reported as
`suite FILE, line N: what is wrong; how to fix it`. PyYAML's node marks give the lines: the
loader below builds dicts and lists that remember the line of each key and item.

    name: demo
    description: every registered method on digits
    model: lenet300            # a zoo model; or a packaged pretrained one (all-minilm-l6-v2) or the path of a
                               # Hugging Face model folder (relative to the suite), which start from their own
                               # weights: no checkpoint, dense, from_scratch or model_options then
    model_options: {}          # keyword options of the zoo model, e.g. {shortcut: identity} for a ResNet
    dataset: digits            # train_size / test_size keep a fixed random subset
    loss: cross-entropy        # the objective every method prunes with and every measurement evaluates under,
                               # built once per run from the dense start; the result column is its graded
                               # metric: cross-entropy -> top-1 (the default), distill -> cosine similarity of
                               # the mean-pooled outputs to the dense model's. Text (kjv) needs `loss: distill`
    dense: {epochs: 30, lr: 0.05}   # trained once (seed 0, in batches of `batch_size`) and cached; or
                               # checkpoint: PATH, or from_scratch: true (with dense: the recipe is
                               # trained only as the dense reference)
    device: cpu                # what the budget is meant for; cuda: refused without --device cuda, unless --quick
    reestimate_bn: false       # true: one train-mode pass re-estimates the dense model's batch-norm statistics
                               # before any method runs (the CHITA code's step before one-shot pruning)
    batch_size: 128            # batches given to methods that need data
    augment: false             # true: those batches get the dataset's training augmentation (CIFAR: crop + flip)
    holdout: 5000              # training examples held out (a fixed draw per seed; never the test set): methods
                               # never see them; entries with `search:` score their candidates on them
    isolate: false             # true: every run in a fresh process, so its peak memory is its own (--isolate)
    training:                  # TrainConfig fields for every method that trains; its own hparams override them
      epochs: 5
      lr: 0.05
    sparsities: [0.5, 0.9]
    seeds: 3                   # or a list of seeds
    methods:
      - method: all            # every registered method with its defaults
      - method: chita          # an explicit entry replaces the method's `all` entry
        label: chita-backsolve
        hparams: {solver: backsolve}
        search: {ridge: [1.0e-4, 1.0e-2]}   # every combination is pruned and scored on the `holdout` slice;
                               # the best one is the run (test accuracy), the scores are stored with it
                               # (not with measure_recorded: the recorded points would be every candidate's)
        budget: {allocation: uniform}
        exclude: [pooler]      # regexes searched in tensor names, left dense (prune's `exclude`)
        sparsities: [0.9]      # this entry only
        optional: true         # skip (with a note) while the method is not registered
      - method: snip
        from_scratch: true     # this entry's runs start from fresh weights of their seed, not the dense model
      - method: imp
        measure_recorded: true # measure the model at every sparsity the method records on its way
                               # (IMP rounds, CHITA++ stages): one more result row each
    published:                 # a paper's numbers for this setting, shown beside ours
      - {method: magnitude, sparsity: 0.9, accuracy: 0.52, source: "Paper et al. 2023, Table 1"}
    quick:                     # what `--quick` changes (mappings merge, other values replace)
      sparsities: [0.9]
    variants:                  # `--variant NAME`: named changes merged like `quick:` (the variant's own
      long:                    # `quick:` merges into the suite's); runs are stored as suite `demo:long`
        description: the same with 30 epochs per training
        training: {epochs: 30}
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import hparams as hparams_lib
from ..api import prune
from ..budgets import Budget, check_sparsity
from ..data import DATA_DIR_ENV, DATASETS, resolve_data_dir
from ..errors import PrunekitError
from ..methods import Method, all_methods
from ..models import MODELS, create_model, list_models
from ..models.hf import CONFIG, PACKAGED
from ..objectives import GRADES
from ..training import TrainConfig
from ..workflow import DEVICES
from .store import DEFAULT_LOSS

SHIPPED = resources.files("prunekit.bench") / "suites"
ALL = "all"
DEFAULT_BATCH_SIZE = 128

TOP_LEVEL_KEYS = ("name", "description", "model", "model_options", "dataset", "train_size", "test_size", "loss",
                  "checkpoint", "dense", "from_scratch", "device", "reestimate_bn", "batch_size", "augment",
                  "holdout", "isolate", "training", "sparsities", "seeds", "methods", "published", "quick",
                  "variants")
STARTS = ("checkpoint", "dense", "from_scratch")
ENTRY_KEYS = ("method", "label", "hparams", "search", "budget", "exclude", "sparsities", "optional",
              "measure_recorded", "from_scratch")
PUBLISHED_KEYS = ("method", "sparsity", "accuracy", "std", "source")
NOT_QUICK = ("name", "description", "quick", "published", "device", "variants")
NOT_IN_VARIANTS = ("name", "variants")
DATA_OWNED_OPTIONS = ("num_classes", "in_channels", "input_size")  # model options that the dataset sets
# Hyperparameters named like prune()'s own arguments take prune's value; so do the names that moved out of the
# hyperparameters (a training method's seed is the run's seed, its batch size the suite's).
PRUNE_ARGUMENTS = frozenset(inspect.signature(prune).parameters) - {"method_hparams"} | set(hparams_lib.RELOCATED)
# The ranges of the suite's own numbers, declared once with the checks of prunekit.hparams.
COUNT = hparams_lib.integer(1)
SEED = hparams_lib.integer(0)
FLAG = hparams_lib.Check("true or false", lambda value: isinstance(value, bool))
FRACTION = hparams_lib.optional(hparams_lib.number(0, 1))
TEXT_LOSS = "distill"  # text comes without labels: the one graded objective that needs none


@dataclass(frozen=True)
class MethodEntry:
    """One line of the comparison: a method with its hyperparameters, budget and sparsities."""

    label: str
    method: str
    hparams: dict[str, Any]  # every field, defaults included
    budget: Budget
    sparsities: tuple[float, ...]
    measure_recorded: bool = False  # a result row at every sparsity the method records (rounds, stages)
    from_scratch: bool = False  # runs start from fresh weights of their seed, not the suite's dense model
    search: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # hyperparameter -> values tried
    exclude: tuple[str, ...] = ()  # regexes of tensor names left dense (prune's `exclude`)

    @property
    def method_hparams(self) -> dict[str, Any]:
        """What goes to prune() as keyword arguments: the fields prune() does not set itself."""
        return _for_prune(self.hparams)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        """The searched values of each candidate: every combination of `search` (one empty candidate without it)."""
        return _combinations(self.search)


def _for_prune(hparams: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in hparams.items() if key not in PRUNE_ARGUMENTS}


def _combinations(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


@dataclass(frozen=True)
class Published:
    label: str
    sparsity: float
    accuracy: float  # a fraction, like ours
    std: float | None
    source: str


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    path: Path
    model: str
    dataset: str
    train_size: int | None
    test_size: int | None
    checkpoint: Path | None  # exactly one of checkpoint, dense and from_scratch says where the model starts
    dense: TrainConfig | None
    from_scratch: bool
    batch_size: int
    seeds: tuple[int, ...]
    methods: tuple[MethodEntry, ...]
    published: tuple[Published, ...] = ()
    notes: tuple[str, ...] = ()  # optional methods left out, said when the suite runs
    lines: Mapping[str, int] = field(default_factory=dict, repr=False)  # top-level key -> line, for later errors
    model_options: Mapping[str, Any] = field(default_factory=dict)
    augment: bool = False  # methods get the dataset's augmented training batches
    device: str = "cpu"  # what the suite's budget is meant for; "cuda" is refused elsewhere unless quick
    reestimate_bn: bool = False  # re-estimate the dense model's batch-norm statistics before the methods run
    quick: bool = False  # loaded with its `quick:` block, as a smoke run
    holdout: int | None = None  # training examples held out of every run; searches score candidates on them
    isolate: bool = False  # every run in a fresh process (its own peak memory)
    variant: str | None = None  # the `variants:` entry loaded, if any
    variants: tuple[str, ...] = ()  # every variant the file declares
    loss: str = DEFAULT_LOSS  # the objective of every prune and measurement (a key of objectives.GRADES)

    @property
    def pretrained(self) -> bool:
        """A packaged model or a Hugging Face folder: it starts from its own weights."""
        return self.model not in MODELS

    @property
    def sparsities(self) -> tuple[float, ...]:
        return tuple(sorted({s for entry in self.methods for s in entry.sparsities}))

    @property
    def stored_name(self) -> str:
        """The suite's name in the runs database and the report: a variant is a suite of its own there."""
        return self.name if self.variant is None else f"{self.name}:{self.variant}"

    @property
    def argument(self) -> str:
        """What `prunekit bench --suite` takes to run this suite: a shipped one's name (else its path), its variant."""
        suite = self.path.stem if self.path.parent == Path(str(SHIPPED)) else str(self.path)
        return suite if self.variant is None else f"{suite} --variant {self.variant}"


# ---------------------------------------------------------------- finding suites

def list_suites() -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, description, variant names) of every shipped suite."""
    suites = []
    for path in sorted(_shipped_files(), key=lambda entry: entry.name):
        document = _read_yaml(Path(str(path))) or {}
        variants = document.get("variants")
        suites.append((path.name.rsplit(".", 1)[0], str(document.get("description", "")),
                       tuple(variants) if isinstance(variants, dict) else ()))
    return suites


def _shipped_names() -> str:
    return ", ".join(name for name, _, _ in list_suites())


def find_suite(name_or_path: str) -> Path:
    """A shipped suite by name, or a suite file by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise PrunekitError(f"suite file {path} does not exist; check the path (or give a shipped suite's name: "
                                f"{_shipped_names()})")
        return path
    for shipped in _shipped_files():
        if shipped.name.rsplit(".", 1)[0] == name_or_path:
            return Path(str(shipped))
    raise PrunekitError(f"no suite named {name_or_path!r}; shipped suites: {_shipped_names()} "
                        "(`prunekit bench --list`), or pass the path of a .yaml file")


def _shipped_files():
    return [entry for entry in SHIPPED.iterdir() if entry.name.endswith((".yaml", ".yml"))]


# ---------------------------------------------------------------- loading

def load_suite(name_or_path: str, *, variant: str | None = None, quick: bool = False, seeds: int | None = None,
               data_dir: str | os.PathLike | None = None) -> Suite:
    """Read and check a suite. `variant` applies one of its `variants:`; `quick` applies its `quick:` block and
    keeps one seed; `seeds=N` runs seeds 0..N-1.

    `${PRUNEKIT_DATA}` in paths is `data_dir` when given; relative paths are relative to the suite file.
    """
    path = find_suite(name_or_path)
    return _Checker(path, data_dir).load(_read_yaml(path), variant, quick, seeds)


class _LineDict(dict):
    """A YAML mapping that remembers the line of itself and of each key."""

    line = 1
    lines: dict


class _LineList(list):
    line = 1
    lines: list


class _SuiteLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _SuiteLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    mapping = _LineDict()
    mapping.line, mapping.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:  # PyYAML would silently keep the last one
            raise PrunekitError(f"line {key_node.start_mark.line + 1}: {key!r} appears twice in this mapping "
                                f"(first on line {mapping.lines[key]}); keep one")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _SuiteLoader, node: yaml.SequenceNode) -> _LineList:
    sequence = _LineList(loader.construct_object(item, deep=True) for item in node.value)
    sequence.line, sequence.lines = node.start_mark.line + 1, [item.start_mark.line + 1 for item in node.value]
    return sequence


_SuiteLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SuiteLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_SuiteLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise PrunekitError(f"suite {path}, line {mark.line + 1 if mark else 1}: not valid YAML "
                            f"({exc.problem or exc.context}); fix the syntax there") from None
    except PrunekitError as exc:  # a duplicate key, found by the loader
        raise PrunekitError(f"suite {path}, {exc}") from None


class _Checker:
    """Turns a parsed YAML document into a Suite, or fails at the first problem with its line."""

    def __init__(self, path: Path, data_dir: str | os.PathLike | None) -> None:
        self.path = path
        self.data_dir = data_dir

    def fail(self, node: Any, key: Any, problem: str) -> PrunekitError:
        line = node.lines.get(key, node.line) if isinstance(node, _LineDict) else _item_line(node, key)
        return PrunekitError(f"suite {self.path}, line {line}: {problem}")

    def load(self, document: Any, variant: str | None, quick: bool, seeds: int | None) -> Suite:
        """The suite as asked; every variant, with and without `quick`, is checked too, so that a mistake in one
        shows now, not on the first run that uses it."""
        if not isinstance(document, _LineDict):
            raise PrunekitError(f"suite {self.path}, line 1: a suite is a YAML mapping with keys "
                                f"{', '.join(TOP_LEVEL_KEYS)}; see `prunekit bench --list` for examples")
        self.known_keys(document, TOP_LEVEL_KEYS, "a suite")
        variants = self.variants(document)
        if variant is not None and variant not in variants:
            known = f"its variants: {', '.join(variants)}" if variants else "it declares none (`variants:`)"
            raise PrunekitError(f"suite {self.path} has no variant {variant!r}; {known}")
        chosen = None
        for name in (None, *variants):
            merged = document if name is None else _merged(document, variants[name])
            for smoke in (False, True):
                suite = self.suite(merged, smoke, seeds, name, tuple(variants))
                if (name, smoke) == (variant, quick):
                    chosen = suite
        return chosen

    def suite(self, document: _LineDict, quick: bool, seeds: int | None, variant: str | None,
              variants: tuple[str, ...]) -> Suite:
        if quick and "quick" in document:
            document = self.with_quick(document)
        for key in ("name", "model", "dataset", "sparsities", "methods"):
            if key not in document:
                raise self.fail(document, None, f"the suite has no `{key}:`; add it")
        model = self.model(document)
        dataset = self.choice(document, "dataset", list(DATASETS))
        if DATASETS[dataset].needs_files:
            self.data_folder(document)
        loss = self.loss(document, dataset)
        checkpoint, dense, from_scratch, model_options = self.start(document, model)
        default_sparsities = self.sparsities(document, "sparsities")
        methods, notes = self.methods(document["methods"], default_sparsities, self.training(document))
        run_seeds = self.seeds(document)
        if quick:
            run_seeds = run_seeds[:1]
        if seeds is not None:
            if not COUNT(seeds):
                raise PrunekitError(f"--seeds must be {COUNT.requirement} (a number of seeds), got {seeds!r}")
            run_seeds = tuple(range(seeds))
        return Suite(
            name=self.text(document, "name"),
            description=str(document.get("description", "")),
            path=self.path,
            model=model,
            dataset=dataset,
            train_size=self.checked(document, "train_size", hparams_lib.optional(COUNT)),
            test_size=self.checked(document, "test_size", hparams_lib.optional(COUNT)),
            checkpoint=checkpoint,
            dense=dense,
            from_scratch=from_scratch,
            batch_size=self.checked(document, "batch_size", COUNT, DEFAULT_BATCH_SIZE),
            seeds=run_seeds,
            methods=methods,
            published=self.published(document),
            notes=notes,
            lines=dict(document.lines),
            model_options=model_options,
            augment=self.augment(document, dataset),
            device=self.choice(document, "device", list(DEVICES)) if "device" in document else "cpu",
            reestimate_bn=self.flag(document, "reestimate_bn"),
            quick=quick,
            holdout=self.holdout(document, methods),
            isolate=self.flag(document, "isolate"),
            variant=variant,
            variants=variants,
            loss=loss,
        )

    # ---- general shapes

    def known_keys(self, mapping: _LineDict, allowed: tuple[str, ...], what: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.fail(mapping, key, f"{what} has no key {key!r}; the keys are: {', '.join(allowed)}")

    def mapping(self, parent: _LineDict, key: str, what: str) -> _LineDict:
        """parent[key] as a mapping; absent or empty (`key:` alone) is an empty mapping."""
        value = parent.get(key)
        if value is None:
            empty = _LineDict()
            empty.line, empty.lines = _item_line(parent, key), {}
            return empty
        if not isinstance(value, _LineDict):
            raise self.fail(parent, key, f"{what} must be a mapping (key: value lines), got {value!r}")
        return value

    def text(self, mapping: _LineDict, key: str) -> str:
        value = mapping[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(mapping, key, f"`{key}` must be a non-empty text, got {value!r}")
        return value

    def checked(self, mapping: _LineDict, key: str, check: hparams_lib.Check, default: Any = None) -> Any:
        """mapping[key] (or `default` when absent), which `check` must accept."""
        value = mapping.get(key, default)
        if not check(value):
            raise self.fail(mapping, key, f"`{key}` must be {check.requirement}, got {value!r}")
        return value

    def flag(self, mapping: _LineDict, key: str) -> bool:
        return self.checked(mapping, key, FLAG, False)

    def choice(self, mapping: _LineDict, key: str, known: list[str]) -> str:
        value = self.text(mapping, key)
        if value not in known:
            raise self.fail(mapping, key, f"unknown {key} {value!r}; use one of {', '.join(known)}")
        return value

    def sparsities(self, mapping: _LineDict, key: str) -> tuple[float, ...]:
        values = mapping[key]
        if not isinstance(values, _LineList) or not values:
            raise self.fail(mapping, key, f"`{key}` must be a non-empty list of fractions, e.g. [0.5, 0.9]")
        checked = []
        for index, value in enumerate(values):
            try:
                checked.append(check_sparsity(value if not isinstance(value, bool) else None))
            except PrunekitError as exc:
                raise self.fail(values, index, str(exc)) from None
        if len(set(checked)) != len(checked):
            raise self.fail(mapping, key, f"`{key}` lists a sparsity twice: {list(checked)}; list each once")
        return tuple(checked)

    def seeds(self, mapping: _LineDict) -> tuple[int, ...]:
        value = mapping.get("seeds", 1)
        if COUNT(value):
            return tuple(range(value))
        listed = isinstance(value, list) and value and len(set(value)) == len(value)
        if listed and all(SEED(seed) for seed in value):
            return tuple(value)
        raise self.fail(mapping, "seeds", f"`seeds` must be a number of seeds ({COUNT.requirement}; 3 runs seeds "
                                          f"0, 1, 2) or a list of distinct seeds, each {SEED.requirement}, "
                                          f"got {value!r}")

    def dataclass_values(self, cls: type, mapping: _LineDict, owner: str) -> Any:
        """hparams.build, with each value checked on its own first so that an error names its line."""
        fields = {info.name: info for info in hparams_lib.describe(cls)}
        for key, value in mapping.items():
            if key in hparams_lib.RELOCATED:
                raise self.fail(mapping, key, f"{hparams_lib.RELOCATED[key]}; remove `{key}` here")
            if key not in fields:
                raise self.fail(mapping, key, f"{owner} has no hyperparameter {key!r}; its hyperparameters are: "
                                              f"{', '.join(fields) or 'none'}")
            try:
                hparams_lib.parse_value(value, fields[key].type, f"{owner} {key}")
            except PrunekitError as exc:
                raise self.fail(mapping, key, str(exc)) from None
        try:
            return hparams_lib.build(cls, dict(mapping), owner)
        except PrunekitError as exc:
            raise self.fail(mapping, None, str(exc)) from None

    # ---- the model, where it starts, and its objective

    def model(self, document: _LineDict) -> str:
        """A zoo model's name, a packaged pretrained model's, or a Hugging Face folder's absolute path."""
        name = self.text(document, "model")
        if name in MODELS or name in PACKAGED:
            return name
        if os.sep in name or name.startswith(("$", "~", ".")):
            folder = self.suite_path(document, "model")
            if not (folder / CONFIG).is_file():
                raise self.fail(document, "model", f"{folder} is no Hugging Face model folder (it has no {CONFIG}); "
                                                   "fix the path or write the model there with save_pretrained")
            return str(folder)
        raise self.fail(document, "model", f"unknown model {name!r}; use a zoo model ({', '.join(list_models())}), "
                                           f"a packaged pretrained one ({', '.join(PACKAGED)}) or the path of a "
                                           "Hugging Face model folder")

    def start(self, document: _LineDict, model: str) -> tuple[Path | None, TrainConfig | None, bool, dict[str, Any]]:
        """(checkpoint, dense recipe, from_scratch, model_options): a zoo model's start, or none for a pretrained
        model, which starts from its own weights and config."""
        if model in MODELS:
            return (self.checkpoint(document), self.dense(document), bool(document.get("from_scratch", False)),
                    self.model_options(document, model))
        given = [key for key in (*STARTS, "model_options") if key in document]
        if given:
            raise self.fail(document, given[0], f"{document['model']} is pretrained and starts from its own weights "
                                                f"and config; remove `{given[0]}` (it is for zoo models)")
        entries = document["methods"] if isinstance(document["methods"], _LineList) else []
        for entry in entries:
            if isinstance(entry, _LineDict) and entry.get("from_scratch"):
                raise self.fail(entry, "from_scratch", f"{document['model']} is pretrained: its runs start from its "
                                                       "own weights, not fresh ones; remove `from_scratch`")
        return None, None, False, {}

    def loss(self, document: _LineDict, dataset: str) -> str:
        """The objective's name, one with a graded metric; text, which has no labels, must name `distill`."""
        text = DATASETS[dataset].text
        if "loss" not in document:
            if text:
                raise self.fail(document, "dataset", f"{dataset} is text without labels, which cross-entropy (the "
                                                     f"default objective) needs; add `loss: {TEXT_LOSS}`")
            return DEFAULT_LOSS
        name = document["loss"]
        graded = ", ".join(f"{objective} (graded by {metric})" for objective, metric in GRADES.items())
        if name not in GRADES:
            raise self.fail(document, "loss", f"`loss` must be an objective whose results have a graded metric: "
                                              f"{graded}; got {name!r}")
        if text and name != TEXT_LOSS:
            raise self.fail(document, "loss", f"{dataset} is text without labels, which {name} needs; use "
                                              f"`loss: {TEXT_LOSS}`")
        return name

    def checkpoint(self, document: _LineDict) -> Path | None:
        starts = [key for key in STARTS if document.get(key) is not None and document[key] is not False]
        if len(starts) != 1 and starts != ["dense", "from_scratch"]:
            problem = "names no dense model" if not starts else f"has both `{starts[0]}` and `{starts[1]}`"
            raise self.fail(document, starts[1] if len(starts) > 1 else None,
                            f"the suite {problem}; give exactly one of `checkpoint: PATH` (trained weights), `dense: "
                            "{...}` (a training recipe, cached) or `from_scratch: true` (fresh weights per seed; "
                            "with `dense:` beside it, the recipe is trained once as the dense reference)")
        if "from_scratch" in document and document["from_scratch"] is not True:
            raise self.fail(document, "from_scratch", "`from_scratch` can only be true; remove the line otherwise")
        if starts[0] != "checkpoint":
            return None
        path = self.suite_path(document, "checkpoint")
        if not path.is_file():
            raise self.fail(document, "checkpoint", f"checkpoint {path} does not exist; fix the path "
                                                    f"(relative paths start at the suite's folder, ${{{DATA_DIR_ENV}}} "
                                                    "and other environment variables are expanded)")
        return path

    def suite_path(self, document: _LineDict, key: str) -> Path:
        """The path `key` names, with environment variables expanded, relative to the suite's folder."""
        path = Path(self.expand(document, key, self.text(document, key))).expanduser()
        return path if path.is_absolute() else self.path.parent / path

    def expand(self, mapping: _LineDict, key: str, text: str) -> str:
        variables = dict(os.environ)
        with contextlib.suppress(PrunekitError):  # none given: `value` below says how to give one
            # Absolute: a relative data folder was named from where the command runs, not from the suite's folder.
            variables[DATA_DIR_ENV] = str(resolve_data_dir(self.data_dir).resolve())

        def value(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            if name not in variables:
                hint = " or pass --data-dir" if name == DATA_DIR_ENV else ""
                raise self.fail(mapping, key, f"`{key}` uses ${{{name}}}, which is not set; set it{hint}")
            return variables[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)

    def data_folder(self, document: _LineDict) -> None:
        """The data set's files are looked for in --data-dir or $PRUNEKIT_DATA: say now when there is none."""
        try:
            folder = resolve_data_dir(self.data_dir)
        except PrunekitError as exc:
            raise self.fail(document, "dataset", str(exc)) from None
        if not folder.is_dir():
            raise self.fail(document, "dataset", f"data folder {folder} does not exist; pass --data-dir DIR or set "
                                                 f"{DATA_DIR_ENV}=DIR, DIR holding MNIST/, FashionMNIST/ or CIFAR10/")

    def dense(self, document: _LineDict) -> TrainConfig | None:
        if document.get("dense") is None:
            return None
        return self.dataclass_values(TrainConfig, self.mapping(document, "dense", "`dense`"), "dense training")

    # ---- model, data and training shared by every entry

    def model_options(self, document: _LineDict, model: str) -> dict[str, Any]:
        """The zoo model's keyword options, checked by building the model once (cheap next to any run)."""
        options = self.mapping(document, "model_options", "`model_options`")
        for key in options:
            if key in DATA_OWNED_OPTIONS:
                raise self.fail(options, key, f"`{key}` follows from the dataset; remove it from `model_options`")
        if options:
            try:
                create_model(model, **options)
            except PrunekitError as exc:
                raise self.fail(document, "model_options", str(exc)) from None
        return dict(options)

    def augment(self, document: _LineDict, dataset: str) -> bool:
        augment = self.flag(document, "augment")
        if augment and not DATASETS[dataset].augment:
            raise self.fail(document, "augment", f"{dataset} has no training augmentation (only the CIFAR data sets "
                                                 "have: random crop + flip); remove `augment`")
        return augment

    def training(self, document: _LineDict) -> _LineDict | None:
        """The recipe every training method starts from: TrainConfig fields less those prune() sets."""
        if document.get("training") is None:
            return None
        values = self.mapping(document, "training", "`training`")
        self.dataclass_values(TrainConfig, values, "training")
        return values

    # ---- methods

    def methods(self, value: Any, default_sparsities: tuple[float, ...],
                training: _LineDict | None) -> tuple[tuple[MethodEntry, ...], tuple[str, ...]]:
        if not isinstance(value, _LineList) or not value:
            raise PrunekitError(f"suite {self.path}, line {getattr(value, 'line', 1)}: `methods` must be a list of "
                                "entries such as `- method: magnitude` (or `- method: all`)")
        registered = {method.name: method for method in all_methods()}
        explicit = {item.get("method") for item in value if isinstance(item, dict)} - {ALL}
        entries: list[tuple[MethodEntry, int]] = []  # with the line that names each entry
        notes: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, _LineDict) or "method" not in item:
                raise self.fail(value, index, "each entry of `methods` is a mapping with at least `method: NAME`")
            self.known_keys(item, ENTRY_KEYS, "a method entry")
            name = self.text(item, "method")
            for flag in ("optional", "measure_recorded", "from_scratch"):
                self.flag(item, flag)
            if "search" in item and item.get("measure_recorded"):
                raise self.fail(item, "search", "an entry with `search:` cannot also have `measure_recorded: true` "
                                                "(the recorded points would be every candidate's); drop one of them")
            sparsities = self.sparsities(item, "sparsities") if "sparsities" in item else default_sparsities
            line = item.lines.get("label", item.line)
            if name == ALL:
                entries += [(entry, line) for entry in
                            self.all_entries(item, registered, explicit, sparsities, training)]
            elif name in registered:
                entries.append((self.entry(item, registered[name], sparsities, training), line))
            elif item.get("optional") is True:
                notes.append(f"{name} is not registered in this version of prunekit; "
                             f"its entry (line {item.line}) is skipped")
            else:
                raise self.fail(item, "method", f"unknown method {name!r}; registered methods: "
                                                f"{', '.join(registered)} (mark the entry `optional: true` to skip it "
                                                "while the method is missing)")
        if not entries:
            raise PrunekitError(f"suite {self.path}, line {value.line}: no method of this suite is registered "
                                f"({'; '.join(notes)}); add a registered method (`prunekit methods` lists them)")
        self.unique_labels(entries)
        if any(isinstance(item, dict) and item.get("method") == ALL for item in value):
            order = list(registered)  # with `all`, methods appear in the registry's order, as `prunekit methods` does
            entries.sort(key=lambda pair: order.index(pair[0].method))
        return tuple(entry for entry, _ in entries), tuple(notes)

    def entry(self, item: _LineDict, method: Method, sparsities: tuple[float, ...],
              training: _LineDict | None) -> MethodEntry:
        label = self.text(item, "label") if "label" in item else method.name
        values = self.mapping(item, "hparams", "`hparams`")
        for key in values:
            if key in PRUNE_ARGUMENTS:
                raise self.fail(values, key, f"`{key}` is an argument of prune() that the bench sets itself (seeds "
                                             "from `seeds:`, the budget from `budget:`, the batch size from "
                                             "`batch_size:`, the objective from `loss:`, the tensors left dense "
                                             "from the entry's `exclude:`); remove it here")
        budget = self.budget(item, sparsities)
        hparams = self.hparams(method, values, training)
        return MethodEntry(label, method.name, hparams, budget, sparsities, item.get("measure_recorded", False),
                           item.get("from_scratch", False), self.search(item, method, hparams), self.exclude(item))

    def search(self, item: _LineDict, method: Method, hparams: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        """The grid {hyperparameter: values}; every combination over the entry's hyperparameters is checked now."""
        grid = self.mapping(item, "search", "`search`")
        for key, values in grid.items():
            if key in PRUNE_ARGUMENTS or key not in hparams:
                raise self.fail(grid, key, f"method {method.name!r} has no hyperparameter {key!r} to search; its "
                                           f"hyperparameters are: {', '.join(hparams) or 'none'}")
            if not isinstance(values, _LineList) or not values:
                raise self.fail(grid, key, f"`search: {{{key}: ...}}` takes a non-empty list of the values to try, "
                                           f"e.g. [{hparams[key]!r}], got {values!r}")
        for candidate in _combinations(grid):
            try:
                hparams_lib.build(method.hparams, {**_for_prune(hparams), **candidate}, f"method {method.name!r}")
            except PrunekitError as exc:
                raise self.fail(item, "search", f"the candidate {candidate} is invalid: {exc}") from None
        return {key: tuple(values) for key, values in grid.items()}

    def all_entries(self, item: _LineDict, registered: dict[str, Method], explicit: set,
                    sparsities: tuple[float, ...], training: _LineDict | None) -> list[MethodEntry]:
        """Every registered method not listed on its own, with its defaults (and the suite's `training`)."""
        for key in ("label", "hparams", "search", "measure_recorded", "from_scratch"):
            if key in item:
                raise self.fail(item, key, f"`method: all` takes no {key}; give a method its own entry "
                                           "(`- method: NAME` with `hparams:`) to change it")
        budget, exclude = self.budget(item, sparsities), self.exclude(item)
        defaults = self.mapping(item, "hparams", "`hparams`")  # empty: `all` takes none
        return [MethodEntry(method.name, method.name, self.hparams(method, defaults, training), budget, sparsities,
                            exclude=exclude)
                for method in registered.values() if method.name not in explicit]

    def hparams(self, method: Method, values: _LineDict, training: _LineDict | None) -> dict[str, Any]:
        """Every field of the method's hyperparameters: its entry's values over the suite's `training`, if it trains."""
        if training is not None and method.trains:
            merged = _merged(training, values)
            merged.line = values.line  # a method's own check that fails names its entry, not `training`
            values = merged
        return hparams_lib.to_dict(self.dataclass_values(method.hparams, values, f"method {method.name!r}"))

    def budget(self, item: _LineDict, sparsities: tuple[float, ...]) -> Budget:
        budget = self.dataclass_values(Budget, self.mapping(item, "budget", "`budget`"), "budget")
        fixed = budget.fixed_sparsity
        if fixed is not None and any(abs(s - fixed) > 1e-9 for s in sparsities):
            raise self.fail(item, "budget", f"{budget.n}:{budget.m} sparsity is always {fixed:g}; give this entry "
                                            f"`sparsities: [{fixed:g}]`")
        return budget

    def exclude(self, item: _LineDict) -> tuple[str, ...]:
        """The entry's `exclude:` (a regex or a list of them, searched in tensor names), each one valid."""
        value = item.get("exclude")
        if value is None:
            return ()
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise self.fail(item, "exclude", "`exclude` takes a regex or a list of regexes searched in tensor names "
                                             f"(e.g. [pooler]), left dense; got {value!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise self.fail(item, "exclude", f"`exclude` pattern {pattern!r} is not a valid regular expression "
                                                 f"({exc}); fix it") from None
        return tuple(patterns)

    def unique_labels(self, entries: list[tuple[MethodEntry, int]]) -> None:
        seen: set[str] = set()
        for entry, line in entries:
            if entry.label in seen:
                raise PrunekitError(f"suite {self.path}, line {line}: two method entries are labelled "
                                    f"{entry.label!r}; give one of them another `label:`")
            seen.add(entry.label)

    # ---- published numbers

    def published(self, document: _LineDict) -> tuple[Published, ...]:
        value = document.get("published")
        if value is None:
            return ()
        if not isinstance(value, _LineList):
            raise self.fail(document, "published", "`published` must be a list of {method, sparsity, accuracy, source}")
        numbers = []
        for index, item in enumerate(value):
            if not isinstance(item, _LineDict):
                raise self.fail(value, index, "each published number is a mapping {method, sparsity, accuracy, source}")
            self.known_keys(item, PUBLISHED_KEYS, "a published number")
            for key in ("method", "sparsity", "accuracy", "source"):
                if key not in item:
                    raise self.fail(item, None, f"this published number has no `{key}`; add it")
            accuracy, std = item["accuracy"], item.get("std")
            for key, number in (("accuracy", accuracy), ("std", std)):
                if not FRACTION(number):
                    raise self.fail(item, key, f"`{key}` is a fraction like our accuracies, {FRACTION.requirement} "
                                               f"(write 93.97% as 0.9397), got {number!r}")
            try:
                sparsity = check_sparsity(item["sparsity"])
            except PrunekitError as exc:
                raise self.fail(item, "sparsity", str(exc)) from None
            numbers.append(Published(str(item["method"]), sparsity, float(accuracy),
                                     None if std is None else float(std), self.text(item, "source")))
        return tuple(numbers)

    # ---- held-out data, variants and quick

    def holdout(self, document: _LineDict, methods: tuple[MethodEntry, ...]) -> int | None:
        holdout = self.checked(document, "holdout", hparams_lib.optional(COUNT))
        searching = next((entry.label for entry in methods if entry.search), None)
        if searching is not None and holdout is None:
            raise self.fail(document, None, f"entry {searching!r} has `search:` but the suite holds out no training "
                                            "data to score its candidates on; add `holdout: N` (e.g. 5000 examples)")
        return holdout

    def variants(self, document: _LineDict) -> dict[str, _LineDict]:
        variants = self.mapping(document, "variants", "`variants`")
        allowed = [key for key in TOP_LEVEL_KEYS if key not in NOT_IN_VARIANTS]
        for name in variants:
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise self.fail(variants, name, f"variant name {name!r} must be letters, digits, '_', '.' or '-' "
                                                "(it is typed after --variant); rename it")
            changes = self.mapping(variants, name, f"variant {name!r}")
            for key in changes:
                if key not in allowed:
                    raise self.fail(changes, key, f"a variant cannot change {key!r}; it may set: {', '.join(allowed)}")
        return {name: self.mapping(variants, name, "") for name in variants}

    def with_quick(self, document: _LineDict) -> _LineDict:
        quick = self.mapping(document, "quick", "`quick`")
        for key in quick:
            if key in NOT_QUICK or key not in TOP_LEVEL_KEYS:
                allowed = [k for k in TOP_LEVEL_KEYS if k not in NOT_QUICK]
                raise self.fail(quick, key, f"`quick` cannot change {key!r}; it may set: {', '.join(allowed)}")
        return _merged(document, quick)


def _merged(base: _LineDict, changes: _LineDict) -> _LineDict:
    """`base` with `changes` applied: mappings merge key by key, other values are replaced."""
    merged = _LineDict(base)
    merged.line, merged.lines = base.line, dict(base.lines)
    for key, value in changes.items():
        if isinstance(value, _LineDict) and isinstance(base.get(key), _LineDict):
            value = _merged(base[key], value)
        merged[key] = value
        merged.lines[key] = changes.lines[key]
    return merged


def _item_line(node: Any, key: Any) -> int:
    if isinstance(node, _LineList) and isinstance(key, int) and 0 <= key < len(node.lines):
        return node.lines[key]
    if isinstance(node, _LineDict):
        return node.lines.get(key, node.line)
    return getattr(node, "line", 1)
