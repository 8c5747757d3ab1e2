"""Run a suite: plan its runs, prepare the dense model once, prune, measure, store each result.

Every run gets the same start (the suite's checkpoint, its cached dense model, or fresh weights
from the run's seed), the same calibration data for the seed, and the same measurements (top-1
and loss on the test split, sparsity per layer, MACs dense and masked), on the device the bench
was given. Only `prunekit.prune`'s cost is the method's cost; measuring is not counted.
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
import platform
import socket
import sys
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
from ..api import prune
from ..checkpoints import load_state_dict_into, read_state_dict
from ..errors import PrunekitError
from ..masks import save_masks, sparsity_report
from ..metrics import count_macs
from ..training import reestimate_batch_norm
from .store import DONE, Outcome, Owner, PlannedRun, Point, Store
from .suite import MethodEntry, Suite

# Files that only present results: editing them must not invalidate stored runs.
PRESENTATION_ONLY = ("cli.py", "tables.py", "bench/report.py")
REESTIMATE_BATCH = 500  # images per batch of the batch-norm re-estimation pass


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


def plan(suite: Suite, device: str = "cpu") -> Plan:
    data = {"model": suite.model, "model_options": dict(suite.model_options), "dataset": suite.dataset,
            "train_size": suite.train_size, "test_size": suite.test_size, "reestimate_bn": suite.reestimate_bn}
    start = _start(suite, device)
    dense_key = content_hash({**data, "start": start})
    # Runs on another device or with other batches are not compared in one table: another setting.
    shared = {"batch_size": suite.batch_size, "augment": suite.augment, "device": device}
    setting = content_hash({"suite": suite.name, "dense": dense_key, **shared})
    version = code_version()
    runs = []
    for entry in suite.methods:
        for sparsity in entry.sparsities:
            for seed in suite.seeds:
                config = {"suite": suite.name, **data, "start": start, "dense_key": dense_key, **shared,
                          "from_scratch": suite.from_scratch or entry.from_scratch, "method": entry.method,
                          "hparams": entry.hparams, "budget": dataclasses.asdict(entry.budget),
                          "measure_recorded": entry.measure_recorded, "sparsity": sparsity, "seed": seed,
                          "code_version": version}
                runs.append(PlannedRun(content_hash(config), suite.name, setting, entry.label, entry.method,
                                       sparsity, seed, config, version))
    return Plan(suite, dense_key, setting, runs, {entry.label: entry for entry in suite.methods})


def _start(suite: Suite, device: str) -> dict[str, Any]:
    if suite.checkpoint is not None:
        return {"checkpoint": str(suite.checkpoint), "sha256": _file_hash(suite.checkpoint)}
    # Keyed by the recipe, not the source hash: retraining on every code edit would cost the most
    # expensive step for a change that rarely touches training. A GPU does not train the CPU's model.
    trained = None if suite.dense is None else {"dense": dataclasses.asdict(suite.dense), "prunekit": __version__,
                                                "torch": torch.__version__, "device": device}
    if suite.from_scratch:  # a recipe beside from_scratch is only the dense reference, not the runs' start
        return {"from_scratch": True, **({"reference": trained} if trained else {})}
    return trained


def check_device(suite: Suite, device: str) -> None:
    """Refuse, before any work, a device this machine lacks, or a GPU suite's full budget anywhere else."""
    workflow.require_device(device)
    if suite.device == "cuda" and device != "cuda" and not suite.quick:
        raise PrunekitError(
            f"suite {suite.path}, line {suite.lines.get('device', 1)}: {suite.name} is a full budget meant for a GPU "
            "(`device: cuda`: a paper's full recipe, days on a CPU); run it on a machine with CUDA: `prunekit bench "
            f"--suite {suite.argument} --device cuda`, or add --quick for a short smoke run on the CPU")


# ---------------------------------------------------------------- running

@dataclass
class Summary:
    plan: Plan
    done_before: int
    ran: int = 0
    elsewhere: int = 0  # held by another live bench process
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"suite {self.plan.suite.name}: {len(self.plan.runs)} runs, {self.done_before} already done, "
                f"{self.ran} run now")
        if self.elsewhere:
            text += f", {self.elsewhere} running in another bench process"
        if self.failures:
            text += f", {len(self.failures)} failed"
        return text


def run_suite(suite: Suite, db: str | os.PathLike, *, device: str = "cpu", data_dir: str | os.PathLike | None = None,
              progress: bool | None = None, echo: Callable[[str], None] = print) -> Summary:
    """Run every run of `suite` not already done in `db` on `device`; results are committed one run at a time."""
    check_device(suite, device)
    bench_plan = plan(suite, device)
    show_bar = sys.stderr.isatty() if progress is None else progress
    with Store(db) as store:
        store.save_suite(suite.name, suite.description, str(suite.path),
                         [dataclasses.asdict(p) for p in suite.published])
        store.register(bench_plan.runs)
        statuses = store.statuses(run.hash for run in bench_plan.runs)
        todo = [run for run in bench_plan.runs if statuses[run.hash] != DONE]
        summary = Summary(bench_plan, done_before=len(bench_plan.runs) - len(todo))
        for note in suite.notes:
            echo(f"note: {note}")
        if todo:
            base = _prepare(suite, bench_plan, store, Path(db), data_dir, device, show_bar, echo)
            _run_all(todo, bench_plan, base, store, Path(db), summary, show_bar, echo)
    return summary


def _run_all(todo: list[PlannedRun], bench_plan: Plan, base: workflow.Setup, store: Store, db: Path,
             summary: Summary, show_bar: bool, echo: Callable[[str], None]) -> None:
    owner = Owner.current()
    env = environment(base.device.type)
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
                outcome = _execute(run, bench_plan, base, masks_dir, env, bar)
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
                    final = outcome.points[-1]
                    echo(f"{run.label} s={run.sparsity:g} seed {run.seed}: top-1 {final.accuracy:.4f}, "
                         f"achieved sparsity {final.sparsity:.4f}, pruning {outcome.cost['seconds']:.2f} s "
                         f"(run {time.perf_counter() - started:.1f} s)")
            bar.update()


def _execute(run: PlannedRun, bench_plan: Plan, base: workflow.Setup, masks_dir: Path, env: dict[str, Any],
             bar: tqdm) -> Outcome:
    suite, entry = bench_plan.suite, bench_plan.entries[run.label]
    model = base.fresh_model(run.seed) if run.config["from_scratch"] else copy.deepcopy(base.model)
    setup = dataclasses.replace(base, model=model)
    # Every method gets the data: a data-free one that trains afterwards (SynFlow) needs it too.
    data = workflow.calibration_loader(setup, suite.batch_size, run.seed, augment=suite.augment)
    points: list[Point] = []

    def observe(_model, event: dict[str, Any]) -> None:
        """Show the method's progress; with `measure_recorded`, a result row at each sparsity it records."""
        details = {key: value for key, value in event.items() if key != "cost"}
        bar.set_postfix_str(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in details.items() if isinstance(v, (int, float, str))), refresh=True)
        if entry.measure_recorded and "sparsity" in event:
            points.append(_measure(setup, final=False, cost=event["cost"], event=details))

    result = prune(setup.model, run.method, run.sparsity, data, budget=entry.budget, seed=run.seed,
                   observer=observe, **entry.method_hparams)
    points.append(_measure(setup, final=True, cost=result.cost.to_dict()))
    mask_path = masks_dir / f"{run.hash}.safetensors"
    save_masks(setup.model, mask_path, {**result.metadata(), "suite": suite.name, "run": run.hash, "seed": run.seed})
    return Outcome(points, result.cost.to_dict(), result.history, env, str(mask_path.resolve()))


def _measure(setup: workflow.Setup, *, final: bool, cost: dict[str, Any], event: dict[str, Any] | None = None) -> Point:
    metrics = workflow.evaluate(setup)
    report = sparsity_report(setup.model)
    macs = count_macs(setup.model, setup.dataset.input_shape)
    return Point(final, report.sparsity, metrics["accuracy"], metrics["loss"],
                 {layer.name: layer.sparsity for layer in report.layers}, macs.dense, macs.masked, cost, event)


# ---------------------------------------------------------------- the dense start

def _prepare(suite: Suite, bench_plan: Plan, store: Store, db: Path, data_dir, device: str, show_bar: bool,
             echo: Callable[[str], None]) -> workflow.Setup:
    """Data and the dense model (the runs' start or reference; trained once per recipe, then cached)."""
    try:
        setup = workflow.setup(suite.model, suite.dataset, data_dir, suite.checkpoint,
                               seed=suite.dense.seed if suite.dense else 0,
                               train_size=suite.train_size, test_size=suite.test_size,
                               model_options=suite.model_options, device=device)
    except PrunekitError as exc:
        lines = ", ".join(f"{key}: line {suite.lines[key]}" for key in ("model", "dataset", "checkpoint")
                          if key in suite.lines)
        raise PrunekitError(f"suite {suite.path} ({lines}): {exc}") from None
    if suite.from_scratch and suite.dense is None:
        return setup
    key = bench_plan.dense_key
    cached, train_seconds = None, None
    if suite.dense is not None:
        cached = db.parent / f"{db.name}.dense" / f"{key}.safetensors"
        train_seconds = _train_or_load(setup, suite, cached, show_bar, echo)
    if suite.reestimate_bn:
        _reestimate_batch_norm(setup, suite)
    known = store.dense(key)
    if known is None or train_seconds is not None:
        metrics = workflow.evaluate(setup)
        macs = count_macs(setup.model, setup.dataset.input_shape).dense
        store.save_dense(key, bench_plan.runs[0].config["start"], None if cached is None else str(cached.resolve()),
                         metrics["accuracy"], metrics["loss"], macs, train_seconds)
        known = store.dense(key)
    echo(f"dense {suite.model} on {suite.dataset}: top-1 {known['accuracy']:.4f}")
    return setup


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
        workflow.train(setup, suite.dense, progress=show_bar)
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
