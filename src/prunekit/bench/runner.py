"""Run a suite: plan its runs, prepare the dense model once, prune, measure, store each result.

Every run gets the same start (the suite's checkpoint, its cached dense model, a pretrained model's
own weights, or fresh weights from the run's seed), the same calibration data for the seed (the
training split less the seed's held-out examples, when the suite holds some out), the same objective
(the suite's `loss:`, built from the dense start), and the same measurements (the objective's graded
metric — top-1, or the cosine to the dense outputs — and loss on the test split, sparsity per layer,
MACs dense and masked, on one example), on the device the bench was given.
Only `prunekit.prune`'s cost is the method's cost; measuring is not counted, nor is a search:
an entry with `search:` prunes once per candidate, scores each on the held-out examples, and its
run is the best candidate's prune. Isolated runs each run in a fresh Python process (nothing of this
one is inherited), whose peak memory is then the run's own.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pickle
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import workflow
from ..version import __version__
from ..api import PruneResult, prune
from ..checkpoints import load_state_dict_into, read_state_dict
from ..errors import PrunekitError
from ..io import atomic_path
from ..masks import save_masks, sparsity_report
from ..metrics import count_macs
from ..models.hf import CONFIG, check_model_folder
from ..objectives import GRADES, Objective, as_objective
from ..targets import find_targets
from ..training import reestimate_batch_norm
from .report import grade_name
from .store import DONE, Outcome, Owner, PlannedRun, Point, Store, measured_dense_key, settings_text
from .suite import MethodEntry, Suite

# Files that only present results: editing them must not invalidate stored runs.
PRESENTATION_ONLY = ("cli.py", "tables.py", "bench/report.py")
REESTIMATE_BATCH = 500  # images per batch of the batch-norm re-estimation pass
DENSE_SEED = 0  # the suite's dense model is initialised and shuffled by this seed, and serves every run's seed


# ---------------------------------------------------------------- identity

def content_hash(value: Any) -> str:
    """A short hash of JSON-able content, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """prunekit's version and a hash of its source files (those that can change a result)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative not in PRESENTATION_ONLY:
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


@functools.cache
def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment(device: str = "cpu") -> dict[str, Any]:
    gpu = {"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
    return {"host": socket.gethostname(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": device, **gpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "prunekit": code_version()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class Plan:
    suite: Suite
    dense_key: str  # the dense start: checkpoint content, training recipe, or fresh weights
    setting: str  # what all runs share; reports never mix settings
    runs: list[PlannedRun]
    entries: dict[str, MethodEntry]  # by label


def plan(suite: Suite, device: str = "cpu", isolate: bool = False) -> Plan:
    """The suite's runs; `isolate` (or the suite's `isolate: true`) runs each in its own process."""
    data = {"model": suite.model, "model_options": dict(suite.model_options), "dataset": suite.dataset,
            "train_size": suite.train_size, "test_size": suite.test_size, "reestimate_bn": suite.reestimate_bn}
    start = _start(suite, device)
    dense_key = content_hash({**data, "start": start})
    # Runs on another device, with other batches or other held-out data, or measured in their own process
    # (another peak memory) are not compared in one table: another setting.
    shared = {"batch_size": suite.batch_size, "augment": suite.augment, "device": device, "variant": suite.variant,
              "holdout": suite.holdout, "isolated": isolate or suite.isolate, "objective": suite.loss}
    setting = content_hash({"suite": suite.stored_name, "dense": dense_key, **shared})
    version = code_version()
    runs = []
    for entry in suite.methods:
        for sparsity in entry.sparsities:
            for seed in suite.seeds:
                config = {"suite": suite.stored_name, **data, "start": start, "dense_key": dense_key, **shared,
                          "from_scratch": suite.from_scratch or entry.from_scratch, "method": entry.method,
                          "hparams": entry.hparams, "search": {key: list(grid) for key, grid in entry.search.items()},
                          "budget": dataclasses.asdict(entry.budget), "exclude": list(entry.exclude),
                          "measure_recorded": entry.measure_recorded,
                          "sparsity": sparsity, "seed": seed, "code_version": version}
                runs.append(PlannedRun(content_hash(config), suite.stored_name, setting, entry.label, entry.method,
                                       sparsity, seed, config, version))
    return Plan(suite, dense_key, setting, runs, {entry.label: entry for entry in suite.methods})


def _start(suite: Suite, device: str) -> dict[str, Any]:
    if suite.pretrained:  # its weights' and config's content: runs are invalidated when they change
        folder = check_model_folder(suite.model)
        files = sorted([folder / CONFIG, *folder.glob("*.safetensors")])
        return {"pretrained": suite.model, "sha256": {path.name: _file_hash(path) for path in files}}
    if suite.checkpoint is not None:
        return {"checkpoint": str(suite.checkpoint), "sha256": _file_hash(suite.checkpoint)}
    # Keyed by the recipe, not the source hash: retraining on every code edit would cost the most
    # expensive step for a change that rarely touches training. A GPU does not train the CPU's model.
    trained = None if suite.dense is None else {"dense": dataclasses.asdict(suite.dense), "seed": DENSE_SEED,
                                                "batch_size": suite.batch_size, "prunekit": __version__,
                                                "torch": torch.__version__, "device": device}
    if suite.from_scratch:  # a recipe beside from_scratch is only the dense reference, not the runs' start
        return {"from_scratch": True, **({"reference": trained} if trained else {})}
    return trained


def check_device(suite: Suite, device: str) -> None:
    """Refuse, before any work, a device this machine lacks, or a GPU suite's full budget anywhere else."""
    workflow.require_device(device)
    if suite.device == "cuda" and device != "cuda" and not suite.quick:
        raise PrunekitError(
            f"suite {suite.path}, line {suite.lines.get('device', 1)}: {suite.stored_name} is a full budget meant for a "
            "GPU (`device: cuda`: a paper's full recipe, days on a CPU); run it on a machine with CUDA: `prunekit bench "
            f"--suite {suite.argument} --device cuda`, or add --quick for a short smoke run on the CPU")


# ---------------------------------------------------------------- the objective and its grade

@dataclass(frozen=True)
class Grading:
    """The suite's objective, built from the dense start (distill keeps a frozen copy of it), and the metric of
    its evaluation that the results hold in their `accuracy` column (higher is better)."""

    name: str  # a key of objectives.GRADES
    objective: Objective

    @classmethod
    def of(cls, name: str, dense: torch.nn.Module) -> Grading:
        return cls(name, as_objective(name, dense))

    @property
    def metric(self) -> str:
        """The graded metric's key in workflow.evaluate's result."""
        return GRADES[self.name]

    def evaluate(self, setup: workflow.Setup) -> tuple[float, float]:
        """(graded metric, mean loss) of the set-up's model on its test split."""
        metrics = workflow.evaluate(setup, self.objective)
        return metrics[self.metric], metrics["loss"]


# ---------------------------------------------------------------- running

@dataclass
class Summary:
    plan: Plan
    done_before: int
    ran: int = 0
    elsewhere: int = 0  # held by another live bench process
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"suite {self.plan.suite.stored_name}: {len(self.plan.runs)} runs, {self.done_before} already done, "
                f"{self.ran} run now")
        if self.elsewhere:
            text += f", {self.elsewhere} running in another bench process"
        if self.failures:
            text += f", {len(self.failures)} failed"
        return text


def run_suite(suite: Suite, db: str | os.PathLike, *, device: str = "cpu", data_dir: str | os.PathLike | None = None,
              isolate: bool = False, progress: bool | None = None, echo: Callable[[str], None] = print) -> Summary:
    """Run every run of `suite` not already done in `db` on `device`; results are committed one run at a time.

    `isolate` (or the suite's `isolate: true`) runs each run in a fresh process.
    """
    check_device(suite, device)
    bench_plan = plan(suite, device, isolate)
    show_bar = sys.stderr.isatty() if progress is None else progress
    with Store(db) as store:
        store.save_suite(suite.stored_name, suite.description, str(suite.path),
                         [dataclasses.asdict(p) for p in suite.published])
        store.register(bench_plan.runs)
        statuses = store.statuses(run.hash for run in bench_plan.runs)
        todo = [run for run in bench_plan.runs if statuses[run.hash] != DONE]
        summary = Summary(bench_plan, done_before=len(bench_plan.runs) - len(todo))
        for note in suite.notes:
            echo(f"note: {note}")
        if todo:
            base = _prepare(suite, bench_plan, store, Path(db), data_dir, device, show_bar, echo)
            with _executor(bench_plan, base, data_dir) as execute:
                _run_all(todo, store, Path(db), summary, execute, show_bar, echo)
    return summary


# How a run is executed: (run, masks folder, environment, progress bar) -> its outcome.
Execute = Callable[[PlannedRun, Path, dict[str, Any], tqdm], Outcome]


@contextlib.contextmanager
def _executor(bench_plan: Plan, base: workflow.Setup, data_dir) -> Iterator[Execute]:
    """In this process, or (isolated) each run in a fresh one that loads the prepared dense model from a file."""
    if not bench_plan.runs[0].config["isolated"]:
        yield functools.partial(_execute, bench_plan=bench_plan, base=base)
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-isolated-") as folder:
        weights = None  # a pretrained model's start is its own weights, which each process loads itself
        if not bench_plan.suite.pretrained:
            weights = Path(folder) / "start.safetensors"
            workflow.save_weights(base, weights, {"bench": "the prepared start of every isolated run"})
        yield functools.partial(_execute_isolated, bench_plan=bench_plan, weights=weights, data_dir=data_dir,
                                device=base.device.type)


def _run_all(todo: list[PlannedRun], store: Store, db: Path, summary: Summary, execute: Execute, show_bar: bool,
             echo: Callable[[str], None]) -> None:
    owner = Owner.current()
    env = environment(summary.plan.runs[0].config["device"])
    masks_dir = db.parent / f"{db.name}.masks"
    with tqdm(total=len(todo), unit="run", disable=not show_bar, dynamic_ncols=True) as bar:
        for run in todo:
            bar.set_description(f"{run.label} s={run.sparsity:g} seed {run.seed}")
            bar.set_postfix_str("")  # the previous run's progress
            if not store.claim(run.hash, owner):
                summary.elsewhere += store.statuses([run.hash])[run.hash] != DONE
                bar.update()
                continue
            started = time.perf_counter()
            try:
                outcome = execute(run, masks_dir, env, bar)
                stored = store.finish(run.hash, owner, outcome)
            except Exception as exc:  # a broken run is recorded and reported; the others still run
                store.fail(run.hash, owner, traceback.format_exc(), env)
                message = f"{run.label} s={run.sparsity:g} seed {run.seed} failed: {type(exc).__name__}: {exc}"
                summary.failures.append(message)
                (bar.write if show_bar else echo)(message)
            except BaseException:  # Ctrl-C: the run goes back to pending for the next bench
                store.release(run.hash, owner)
                raise
            else:
                summary.ran += stored
                if not show_bar:
                    echo(_one_line(run, outcome, time.perf_counter() - started))
            bar.update()


def _one_line(run: PlannedRun, outcome: Outcome, seconds: float) -> str:
    final = outcome.points[-1]
    chosen = f", chose {settings_text(outcome.search['chosen'])} on the held-out data" if outcome.search else ""
    grade = grade_name(run.config["objective"]).short
    return (f"{run.label} s={run.sparsity:g} seed {run.seed}: {grade} {final.accuracy:.4f}, achieved sparsity "
            f"{final.sparsity:.4f}, pruning {outcome.cost['seconds']:.2f} s{chosen} (run {seconds:.1f} s)")


def _execute(run: PlannedRun, masks_dir: Path, env: dict[str, Any], bar: tqdm, *, bench_plan: Plan,
             base: workflow.Setup) -> Outcome:
    suite, entry = bench_plan.suite, bench_plan.entries[run.label]
    grading = Grading.of(run.config["objective"], base.model)  # before any pruning: the dense reference
    model = base.fresh_model(run.seed) if run.config["from_scratch"] else copy.deepcopy(base.model)
    setup, held_out = _held_out(dataclasses.replace(base, model=model), suite.holdout, run.seed)
    points: list[Point] = []

    def observe(_model, event: dict[str, Any]) -> None:
        """Show the method's progress; with `measure_recorded`, a result row at each sparsity it records."""
        details = {key: value for key, value in event.items() if key != "cost"}
        bar.set_postfix_str(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in details.items() if isinstance(v, (int, float, str))), refresh=True)
        if entry.measure_recorded and "sparsity" in event:
            points.append(_measure(setup, grading, final=False, cost=event["cost"], event=details))

    def prune_with(model: torch.nn.Module, candidate: dict[str, Any]) -> PruneResult:
        """Prune `model` with the entry's hyperparameters, and `candidate`'s over them."""
        # Every method gets the data: a data-free one that trains afterwards (SynFlow) needs it too. A new
        # loader each time, so that every candidate sees the same batches.
        data = workflow.calibration_loader(setup, suite.batch_size, run.seed, augment=suite.augment)
        return prune(model, run.method, run.sparsity, data, budget=entry.budget, exclude=list(entry.exclude) or None,
                     seed=run.seed, loss=grading.objective, observer=observe, **{**entry.method_hparams, **candidate})

    search = None
    if entry.search:
        model, result, search = _search(entry, setup, prune_with, held_out, suite.holdout, grading)
        setup = dataclasses.replace(setup, model=model)
    else:
        result = prune_with(setup.model, {})
    points.append(_measure(setup, grading, final=True, cost=result.cost.to_dict()))
    mask_path = masks_dir / f"{run.hash}.safetensors"
    save_masks(setup.model, mask_path, {**result.metadata(), "suite": run.suite, "run": run.hash, "seed": run.seed})
    return Outcome(points, result.cost.to_dict(), result.history, env, str(mask_path.resolve()), search)


def _held_out(setup: workflow.Setup, holdout: int | None, seed: int) -> tuple[workflow.Setup, workflow.Setup | None]:
    """The set-up whose training split lacks the seed's held-out examples, and one whose test split is them."""
    if holdout is None:
        return setup, None
    rest, held_out = setup.dataset.train.split(holdout, seed)
    return (dataclasses.replace(setup, dataset=dataclasses.replace(setup.dataset, train=rest)),
            dataclasses.replace(setup, dataset=dataclasses.replace(setup.dataset, test=held_out)))


def _search(entry: MethodEntry, setup: workflow.Setup, prune_with: Callable, held_out: workflow.Setup,
            holdout: int, grading: Grading) -> tuple[torch.nn.Module, PruneResult, dict[str, Any]]:
    """Every candidate prunes a copy of the start and is scored by the graded metric on the held-out examples; the
    best (the first of equals) wins. Returns its model, its prune's result and the record of the search."""
    best, scores = None, []
    for candidate in entry.candidates:
        model = copy.deepcopy(setup.model)
        result = prune_with(model, candidate)
        grade, loss = grading.evaluate(dataclasses.replace(held_out, model=model))
        scores.append({"hparams": candidate, "accuracy": grade, "loss": loss, "seconds": result.cost.seconds})
        if best is None or grade > best[2]["accuracy"]:
            best = (model, result, scores[-1])
    model, result, chosen = best
    record = {"holdout": holdout, "metric": f"{grade_name(grading.name).short} on the held-out training examples",
              "chosen": chosen["hparams"], "candidates": scores}
    return model, result, record


# ---------------------------------------------------------------- a run in its own process

def _execute_isolated(run: PlannedRun, masks_dir: Path, env: dict[str, Any], bar: tqdm, *, bench_plan: Plan,
                      weights: Path | None, data_dir, device: str) -> Outcome:
    """The run in a fresh Python process: its peak memory is this run's alone. Its errors come back as ours."""
    with tempfile.TemporaryDirectory(prefix="prunekit-run-") as folder:
        request, reply = Path(folder) / "request.pickle", Path(folder) / "reply.pickle"
        request.write_bytes(pickle.dumps((bench_plan.suite, run, weights, data_dir, device, masks_dir, env,
                                          torch.get_num_threads())))
        code = "import sys; from prunekit.bench.runner import isolated_run; isolated_run(sys.argv[1], sys.argv[2])"
        exit_code = subprocess.run([sys.executable, "-c", code, str(request), str(reply)]).returncode
        if not reply.exists():
            raise RuntimeError(f"the run's own process ended with exit code {exit_code} before reporting (killed "
                               "for memory?)")
        status, value = pickle.loads(reply.read_bytes())
    if status == "error":
        raise RuntimeError(f"in the run's own process: {value}")
    return value


def isolated_run(request: str, reply: str) -> None:
    """In the run's own process: the suite's model from the prepared start (a pretrained model's own weights when
    `weights` is None), the run, its outcome written back."""
    suite, run, weights, data_dir, device, masks_dir, env, threads = pickle.loads(Path(request).read_bytes())
    torch.set_num_threads(threads)
    try:
        base = workflow.setup(suite.model, suite.dataset, data_dir, weights, train_size=suite.train_size,
                              test_size=suite.test_size, model_options=suite.model_options, device=device)
        bench_plan = Plan(suite, run.config["dense_key"], run.setting, [run], {e.label: e for e in suite.methods})
        with tqdm(disable=True) as bar:
            outcome = _execute(run, masks_dir, env, bar, bench_plan=bench_plan, base=base)
        # The process's own peak: the data and model it loaded, and the prune.
        outcome.cost["process_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        answer = ("done", outcome)
    except Exception as exc:  # sent back whole: the bench records it as the run's failure
        answer = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with atomic_path(reply) as partial:  # whole or absent: absent means the process died
        partial.write_bytes(pickle.dumps(answer))


def _measure(setup: workflow.Setup, grading: Grading, *, final: bool, cost: dict[str, Any],
             event: dict[str, Any] | None = None) -> Point:
    grade, loss = grading.evaluate(setup)
    report = sparsity_report(setup.model)
    macs = count_macs(setup.model, setup.macs_example())
    return Point(final, report.sparsity, grade, loss,
                 {layer.name: layer.sparsity for layer in report.layers}, macs.dense, macs.masked, cost, event)


# ---------------------------------------------------------------- the dense start

def _prepare(suite: Suite, bench_plan: Plan, store: Store, db: Path, data_dir, device: str, show_bar: bool,
             echo: Callable[[str], None]) -> workflow.Setup:
    """Data and the dense model (the runs' start or reference; trained once per recipe, then cached)."""
    try:
        setup = workflow.setup(suite.model, suite.dataset, data_dir, suite.checkpoint,
                               seed=DENSE_SEED,
                               train_size=suite.train_size, test_size=suite.test_size,
                               model_options=suite.model_options, device=device)
    except PrunekitError as exc:
        lines = ", ".join(f"{key}: line {suite.lines[key]}" for key in ("model", "dataset", "checkpoint")
                          if key in suite.lines)
        raise PrunekitError(f"suite {suite.path} ({lines}): {exc}") from None
    if suite.holdout is not None and suite.holdout >= len(setup.dataset.train):
        raise PrunekitError(f"suite {suite.path}, line {suite.lines.get('holdout', 1)}: `holdout: {suite.holdout}` "
                            f"leaves nothing of the {len(setup.dataset.train)} training examples; hold out fewer")
    _check_excludes(suite, setup.model)
    if suite.from_scratch and suite.dense is None:
        return setup
    key = bench_plan.dense_key
    cached, train_seconds = None, None
    if suite.dense is not None:
        cached = db.parent / f"{db.name}.dense" / f"{key}.safetensors"
        train_seconds = _train_or_load(setup, suite, cached, show_bar, echo)
    if suite.reestimate_bn:
        _reestimate_batch_norm(setup, suite)
    measured = measured_dense_key(key, suite.loss)
    known = store.dense(measured)
    if known is None or train_seconds is not None:
        grade, loss = Grading.of(suite.loss, setup.model).evaluate(setup)
        macs = count_macs(setup.model, setup.macs_example()).dense
        store.save_dense(measured, bench_plan.runs[0].config["start"],
                         None if cached is None else str(cached.resolve()), grade, loss, macs, train_seconds)
        known = store.dense(measured)
    echo(f"dense {suite.model} on {suite.dataset}: {grade_name(suite.loss).short} {known['accuracy']:.4f}")
    return setup


def _check_excludes(suite: Suite, model: torch.nn.Module) -> None:
    """Every entry's `exclude:` must name tensors of the model: said once now, not by each of its runs."""
    for entry in suite.methods:
        if entry.exclude:
            try:
                find_targets(model, exclude=list(entry.exclude))
            except PrunekitError as exc:
                raise PrunekitError(f"suite {suite.path}, entry {entry.label!r}: {exc}") from None


def _reestimate_batch_norm(setup: workflow.Setup, suite: Suite) -> None:
    """One train-mode pass over the (augmented, as in training) training set; every run starts from it."""
    passes = setup.loader("train", REESTIMATE_BATCH, seed=0)
    if reestimate_batch_norm(setup.model, passes, setup.device) == 0:
        raise PrunekitError(f"suite {suite.path}, line {suite.lines.get('reestimate_bn', 1)}: `reestimate_bn: true` "
                            f"but {suite.model} has no batch-norm layer; remove `reestimate_bn`")


def _train_or_load(setup: workflow.Setup, suite: Suite, cached: Path, show_bar: bool,
                   echo: Callable[[str], None]) -> float | None:
    """Train the dense model by the suite's recipe, or load it if cached; the seconds trained, or None."""
    with _exclusive(cached.with_suffix(".lock")):  # a second bench waits for the first one's training
        if cached.exists():
            load_state_dict_into(setup.model, read_state_dict(cached)[0])
            return None
        echo(f"training the dense {suite.model} on {suite.dataset} ({suite.dense.epochs} epochs), cached as {cached}")
        started = time.perf_counter()
        workflow.train(setup, suite.dense, batch_size=suite.batch_size, seed=DENSE_SEED, progress=show_bar)
        seconds = time.perf_counter() - started
        workflow.save_weights(setup, cached, {"training": dataclasses.asdict(suite.dense)})
        return seconds


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An advisory lock that the OS releases when its holder dies, even by kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
