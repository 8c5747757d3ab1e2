"""Bench runs: stored once, resumed after kill -9 or Ctrl-C, shared safely by concurrent processes."""
import contextlib
import dataclasses
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

from prunekit import workflow
from prunekit.bench import Store, load_suite, run_suite, write_report
from prunekit.bench.runner import check_device, plan
from prunekit.bench.store import DONE, PENDING, RUNNING, Owner
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.masks import read_masks
from prunekit.methods import _REGISTRY, Method
from prunekit.models import create_model_for

SUITE = """\
name: tiny
model: lenet300
dataset: synthetic
train_size: 600
test_size: 200
dense: {epochs: 2, lr: 0.05}
batch_size: 64
sparsities: [0.5, 0.9]
seeds: 2
methods:
  - method: magnitude
  - method: random
"""

# The command line, with one extra method that takes its time, so that a run can be caught in progress.
SLOW_CLI = """\
import os, pathlib, sys, time
from dataclasses import dataclass, field
from prunekit.methods import register

@dataclass(frozen=True)
class SlowHparams:
    seconds: float = field(default=0.3, metadata={"help": "pause before scoring"})

MEET = os.environ.get("MEET")  # "folder,count": the first run of each process waits until `count` processes are in one

@register("slow-test", SlowHparams, "magnitude after a pause (tests)")
def slow(ctx, hp):
    global MEET
    if MEET:
        folder, count = MEET.split(",")
        (pathlib.Path(folder) / str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(list(pathlib.Path(folder).iterdir())) < int(count) and time.monotonic() < deadline:
            time.sleep(0.01)
        MEET = None
    time.sleep(hp.seconds)
    return ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets})

barrier = sys.argv.pop(1)  # "-": start at once; else wait until every file named (comma-separated) exists
if barrier != "-":
    names = barrier.split(",")
    pathlib.Path(names[0]).touch()
    while not all(pathlib.Path(name).exists() for name in names):
        time.sleep(0.01)
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def slow_suite(seeds: int, seconds: float) -> str:
    return SUITE.replace("seeds: 2", f"seeds: {seeds}").replace(
        "  - method: magnitude\n  - method: random\n", f"  - method: slow-test\n    hparams: {{seconds: {seconds}}}\n")


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def rows(db, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return connection.execute(query).fetchall()


def execute(db, statement: str, arguments: tuple) -> None:
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute(statement, arguments)


def start_cli(tmp_path, suite_text: str, db, barrier: str = "-", meet: str = "") -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    suite = tmp_path / "slow.yaml"
    suite.write_text(suite_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEET": meet}
    return subprocess.Popen([sys.executable, str(script), barrier, "bench", "--suite", str(suite), "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_runs_are_stored_once_and_not_repeated(tmp_path, suite_file):
    db = tmp_path / "runs.db"
    said = []
    summary = run_suite(load_suite(str(suite_file)), db, progress=False, echo=said.append)
    assert (summary.done_before, summary.ran, summary.failures) == (0, 8, [])
    assert any("training the dense lenet300" in line for line in said)
    assert rows(db, "SELECT status, count(*) FROM runs GROUP BY status") == [(DONE, 8)]
    assert rows(db, "SELECT count(*), sum(final) FROM results") == [(8, 8)]
    sparsity, accuracy, macs_dense, macs = rows(
        db, "SELECT r.sparsity, accuracy, macs_dense, macs FROM results r JOIN runs ON r.run_hash = runs.hash "
            "WHERE method = 'magnitude' AND runs.sparsity = 0.9")[0]
    assert abs(sparsity - 0.9) < 1e-4 and 0 <= accuracy <= 1
    lowest_at_half = rows(db, "SELECT min(accuracy) FROM results r JOIN runs ON r.run_hash = runs.hash "
                              "WHERE method = 'magnitude' AND runs.sparsity = 0.5")[0][0]
    assert lowest_at_half > 0.15  # above chance (0.1): the runs measured a model that learned (0.29 measured)
    assert macs_dense == 64 * 300 + 300 * 100 + 100 * 10 and abs(macs / macs_dense - 0.1) < 1e-3
    masks = rows(db, "SELECT mask_path FROM runs")
    assert all(os.path.exists(path) for (path,) in masks)
    with Store(db) as store:
        environment = store.runs()[0].environment
    assert environment["torch"] and environment["threads"] >= 1 and environment["prunekit"].startswith("0.")

    said.clear()  # the same suite again: nothing is run, the dense model is not trained again
    again = run_suite(load_suite(str(suite_file)), db, progress=False, echo=said.append)
    assert (again.done_before, again.ran) == (8, 0) and not any("training" in line for line in said)
    assert rows(db, "SELECT max(attempts) FROM runs") == [(1,)]

    relabelled = suite_file.read_text().replace("  - method: random\n", "  - method: random\n    label: control\n")
    suite_file.write_text(relabelled)  # a label is presentation: same runs, new name
    assert run_suite(load_suite(str(suite_file)), db, progress=False, echo=said.append).ran == 0
    assert rows(db, "SELECT DISTINCT label FROM runs WHERE method = 'random'") == [("control",)]
    more = run_suite(load_suite(str(suite_file), seeds=3), db, progress=False, echo=said.append)
    assert (more.done_before, more.ran) == (8, 4)  # only the new seed runs


def test_a_failing_run_is_recorded_and_the_others_still_run(tmp_path, suite_file, monkeypatch):
    def broken(ctx, hp):
        raise ValueError("scores went NaN")

    @dataclass(frozen=True)
    class NoHparams:
        pass

    monkeypatch.setitem(_REGISTRY, "broken-test", Method("broken-test", broken, NoHparams, "fails"))
    suite_file.write_text(SUITE.replace("  - method: random\n", "  - method: broken-test\n"))
    db = tmp_path / "runs.db"
    summary = run_suite(load_suite(str(suite_file)), db, progress=False, echo=lambda line: None)
    assert summary.ran == 4 and len(summary.failures) == 4
    assert "broken-test s=0.5 seed 0 failed: ValueError: scores went NaN" in summary.failures
    errors = rows(db, "SELECT error FROM runs WHERE status = 'failed'")
    assert len(errors) == 4 and all("Traceback" in e and "scores went NaN" in e for (e,) in errors)
    retried = run_suite(load_suite(str(suite_file)), db, progress=False, echo=lambda line: None)
    assert (retried.done_before, len(retried.failures)) == (4, 4)  # failed runs are tried again
    assert rows(db, "SELECT DISTINCT attempts FROM runs WHERE status = 'failed'") == [(2,)]


def test_recorded_sparsities_give_result_rows_when_asked(tmp_path, suite_file, monkeypatch):
    @dataclass(frozen=True)
    class StepsHparams:
        steps: int = field(default=3, metadata={"help": "stages"})

    def staged(ctx, hp):
        from prunekit.masks import attach_masks

        for stage in range(1, hp.steps + 1):
            masks = ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets}, ctx.sparsity * stage / hp.steps)
            attach_masks(ctx.model, masks)
            ctx.record(stage=stage, sparsity=ctx.sparsity * stage / hp.steps)
        return masks

    monkeypatch.setitem(_REGISTRY, "staged-test", Method("staged-test", staged, StepsHparams, "stages"))
    suite_file.write_text(SUITE.replace("seeds: 2", "seeds: 1").replace(
        "  - method: random\n", "  - method: staged-test\n    measure_recorded: true\n    sparsities: [0.9]\n"))
    db = tmp_path / "runs.db"
    run_suite(load_suite(str(suite_file)), db, progress=False, echo=lambda line: None)
    with Store(db) as store:
        staged_run = next(run for run in store.runs() if run.method == "staged-test")
        magnitude_run = next(run for run in store.runs() if run.method == "magnitude")
    assert [round(p.sparsity, 4) for p in staged_run.points] == [0.3, 0.6, 0.9, 0.9]
    assert [p.final for p in staged_run.points] == [False, False, False, True]
    assert [p.event["stage"] for p in staged_run.points[:3]] == [1, 2, 3]
    assert staged_run.points[0].accuracy >= staged_run.points[-1].accuracy - 0.05
    assert len(staged_run.history) == 3 and len(magnitude_run.points) == 1


def test_ctrl_c_gives_the_run_back(tmp_path, suite_file, monkeypatch):
    calls = []

    def interrupted_once(ctx, hp):
        calls.append(ctx.sparsity)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets})

    @dataclass(frozen=True)
    class NoHparams:
        pass

    monkeypatch.setitem(_REGISTRY, "ctrl-c-test", Method("ctrl-c-test", interrupted_once, NoHparams, "Ctrl-C"))
    suite_file.write_text(SUITE.replace("seeds: 2", "seeds: 1").replace("  - method: random\n", "")
                          .replace("method: magnitude", "method: ctrl-c-test"))
    db = tmp_path / "runs.db"
    with pytest.raises(KeyboardInterrupt):
        run_suite(load_suite(str(suite_file)), db, progress=False, echo=lambda line: None)
    assert rows(db, "SELECT sparsity, status, owner_pid FROM runs ORDER BY sparsity") == [
        (0.5, DONE, os.getpid()), (0.9, PENDING, None)]
    resumed = run_suite(load_suite(str(suite_file)), db, progress=False, echo=lambda line: None)
    assert (resumed.done_before, resumed.ran) == (1, 1) and calls == [0.5, 0.9, 0.9]


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path, suite_file):
    db = tmp_path / "runs.db"
    run_suite(load_suite(str(suite_file), seeds=1), db, progress=False, echo=lambda line: None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(db) as store:
        run_hash = store.runs()[0].hash
        ghost = Owner(Owner.current().host, dead.pid, "1")
        rows_before = rows(db, f"SELECT attempts FROM runs WHERE hash = '{run_hash}'")
        # as kill -9 leaves it: running, owned by a process that is gone
        execute(db, "UPDATE runs SET status = ?, owner_host = ?, owner_pid = ?, owner_start = ? WHERE hash = ?",
                (RUNNING, ghost.host, ghost.pid, ghost.start, run_hash))
        me = Owner.current()
        assert store.claim(run_hash, me)
        assert not store.claim(run_hash, Owner(me.host, me.pid + 1, "other"))  # a live owner keeps its run
        assert rows(db, f"SELECT attempts FROM runs WHERE hash = '{run_hash}'") == [(rows_before[0][0] + 1,)]
        other_host = Owner("elsewhere", 1, "1")  # another machine's process is assumed alive
        execute(db, "UPDATE runs SET owner_host = 'elsewhere' WHERE hash = ?", (run_hash,))
        assert other_host.is_alive() and not store.claim(run_hash, me)


@dataclass(frozen=True)
class NoHparams:
    pass


@pytest.fixture
def start_recorder(monkeypatch):
    """A method that keeps the first weight matrix it is given, by (sparsity, seed), then prunes by magnitude."""
    starts = {}

    def record(ctx, hp):
        starts[(ctx.sparsity, ctx.seed)] = next(ctx.model.parameters()).detach().clone()
        return ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets})

    monkeypatch.setitem(_REGISTRY, "start-test", Method("start-test", record, NoHparams, "records its start"))
    return starts


def fresh_first_weights(seed: int, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    return next(create_model_for("lenet300", 10, (1, 8, 8), **options).parameters()).detach()


def test_entries_marked_from_scratch_start_from_their_seeds_fresh_weights(tmp_path, suite_file, start_recorder):
    suite_file.write_text(SUITE.replace("  - method: magnitude\n  - method: random\n", (
        "  - method: start-test\n    label: at-init\n    from_scratch: true\n    sparsities: [0.5]\n"
        "  - method: start-test\n    label: from-dense\n    sparsities: [0.9]\n")))
    run_suite(load_suite(str(suite_file)), tmp_path / "runs.db", progress=False, echo=lambda line: None)
    for seed in (0, 1):
        assert torch.equal(start_recorder[(0.5, seed)], fresh_first_weights(seed))
    dense = start_recorder[(0.9, 0)]
    assert torch.equal(start_recorder[(0.9, 1)], dense) and not torch.equal(dense, fresh_first_weights(0))


def test_a_from_scratch_suite_trains_its_dense_recipe_once_as_the_reference(tmp_path, suite_file, start_recorder):
    text = SUITE.replace("dense:", "model_options: {hidden: [20, 10]}\nfrom_scratch: true\ndense:").replace(
        "  - method: magnitude\n  - method: random\n", "  - method: start-test\n").replace(
        "dense: {epochs: 2, lr: 0.05}", "dense: {epochs: 4, lr: 0.1}")  # a recipe that learns
    suite_file.write_text(text)
    db, said = tmp_path / "runs.db", []
    suite = load_suite(str(suite_file))
    summary = run_suite(suite, db, progress=False, echo=said.append)
    assert summary.ran == 4 and any("training the dense lenet300" in line for line in said)
    for sparsity, seed in itertools.product((0.5, 0.9), (0, 1)):  # the runs start fresh, not from the reference
        assert torch.equal(start_recorder[(sparsity, seed)], fresh_first_weights(seed, hidden=(20, 10)))
    with Store(db) as store:
        reference = store.dense(summary.plan.dense_key)
        runs = store.runs()
    assert reference["accuracy"] > 0.3 and reference["train_seconds"] > 0  # the dense row, trained (chance: 0.1), timed
    assert reference["macs"] == 64 * 20 + 20 * 10 + 10 * 10  # model_options reach the model
    assert all(run.config["from_scratch"] and run.config["start"]["reference"] for run in runs)
    said.clear()
    assert run_suite(suite, db, progress=False, echo=said.append).ran == 0 and not any("training" in s for s in said)


def test_augment_reaches_the_methods_data(tmp_path, suite_file, monkeypatch):
    asked = []
    plain = workflow.calibration_loader

    def spy(setup, batch_size, seed, augment=False):
        asked.append(augment)
        return plain(setup, batch_size, seed)

    monkeypatch.setattr(workflow, "calibration_loader", spy)
    suite = dataclasses.replace(load_suite(str(suite_file), seeds=1), augment=True)  # synthetic data has none
    run_suite(suite, tmp_path / "runs.db", progress=False, echo=lambda line: None)
    assert asked == [True] * 4
    assert plan(suite).setting != plan(dataclasses.replace(suite, augment=False)).setting


GPU_SUITE = SUITE.replace("seeds: 2", "seeds: 2\ndevice: cuda") + "quick:\n  sparsities: [0.9]\n"


def test_cuda_is_refused_before_any_work_where_torch_has_none(tmp_path, suite_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    db = tmp_path / "runs.db"
    with pytest.raises(PrunekitError, match=r"--device cuda asked for, but torch.cuda.is_available\(\) is false"):
        run_suite(load_suite(str(suite_file)), db, device="cuda", progress=False, echo=lambda line: None)
    with pytest.raises(PrunekitError, match="unknown device 'tpu'; use one of cpu, cuda"):
        run_suite(load_suite(str(suite_file)), db, device="tpu", progress=False, echo=lambda line: None)
    assert not db.exists()


def test_a_gpu_suite_runs_on_the_cpu_only_as_a_quick_smoke_run(tmp_path, monkeypatch):
    path, db = tmp_path / "gpu.yaml", tmp_path / "runs.db"
    path.write_text(GPU_SUITE)
    with pytest.raises(PrunekitError) as refused:
        run_suite(load_suite(str(path)), db, progress=False, echo=lambda line: None)
    assert str(refused.value).startswith(f"suite {path}, line 10: tiny is a full budget meant for a GPU")
    assert f"`prunekit bench --suite {path} --device cuda`" in str(refused.value) and "--quick" in str(refused.value)
    assert not db.exists()
    with monkeypatch.context() as cuda_here:
        cuda_here.setattr(torch.cuda, "is_available", lambda: True)
        check_device(load_suite(str(path)), "cuda")  # where CUDA is, the full budget may run
    summary = run_suite(load_suite(str(path), quick=True), db, progress=False, echo=lambda line: None)
    assert (summary.ran, summary.failures) == (2, [])
    with Store(db) as store:
        environment = store.runs()[0].environment
    assert environment["device"] == "cpu" and "gpu" not in environment


def test_the_command_line_takes_a_device_and_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, db = tmp_path / "gpu.yaml", tmp_path / "runs.db"
    path.write_text(GPU_SUITE)
    assert main(["bench", "--suite", str(path), "--db", str(db), "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is false" in capsys.readouterr().err
    assert main(["bench", "--suite", str(path), "--db", str(db)]) == 2
    assert "is a full budget meant for a GPU" in capsys.readouterr().err and not db.exists()
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--device {cpu,cuda}" in capsys.readouterr().out


# ---------------------------------------------------------------- variants, searches, runs in their own process

@dataclass(frozen=True)
class OrderHparams:
    largest: bool = field(default=True, metadata={"help": "keep the largest weights (else the smallest)"})


@pytest.fixture
def order_method(monkeypatch):
    """A method with a known best setting (keeping the largest weights is magnitude pruning; keeping the smallest
    ruins the model); returns the number of training examples each of its prunes was given."""
    examples = []

    def run(ctx, hp):
        examples.append(sum(len(targets) for _, targets in ctx.data))
        sign = 1 if hp.largest else -1
        return ctx.select({t.name: sign * t.weight.detach().abs() for t in ctx.targets})

    monkeypatch.setitem(_REGISTRY, "order-test", Method("order-test", run, OrderHparams, "largest or smallest"))
    return examples


def masks_equal(first, second) -> bool:
    """Whether two stored runs' mask files hold the same masks."""
    ours, theirs = read_masks(first.mask_path)[0], read_masks(second.mask_path)[0]
    return ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_search_keeps_the_candidate_the_held_out_examples_prefer(tmp_path, suite_file, order_method):
    suite_file.write_text(SUITE.replace("seeds: 2", "seeds: 1\nholdout: 100").replace(
        "  - method: random\n", "  - method: order-test\n    search: {largest: [false, true]}\n"))
    db = tmp_path / "runs.db"
    said = []
    summary = run_suite(load_suite(str(suite_file)), db, progress=False, echo=said.append)
    assert (summary.ran, summary.failures) == (4, [])
    assert order_method == [500] * 4  # 2 candidates x 2 sparsities, never shown the 100 held-out examples
    assert any("order-test s=0.5 seed 0" in line and "chose largest=True on the held-out data" in line
               for line in said)
    with Store(db) as store:
        runs = {(run.label, run.sparsity): run for run in store.runs()}
    for sparsity in (0.5, 0.9):
        searched, magnitude = runs["order-test", sparsity], runs["magnitude", sparsity]
        scores = {candidate["hparams"]["largest"]: candidate["accuracy"] for candidate in searched.search["candidates"]}
        assert searched.search["chosen"] == {"largest": True} and scores[True] > scores[False]
        assert searched.search["holdout"] == 100 and searched.config["search"] == {"largest": [False, True]}
        assert searched.final.accuracy == magnitude.final.accuracy  # the chosen one is the run, tested on the test set
        assert masks_equal(searched, magnitude)
        assert magnitude.search is None
    report = (write_report(db, tmp_path / "report")[0]).read_text()
    assert "### Hyperparameters searched on held-out data" in report and "scored by top-1 on 100 training" in report
    assert "| order-test | 0.9 | 0 | largest=True | largest=False: " in report


def test_isolated_runs_give_the_in_process_results_and_their_own_peak_memory(tmp_path, suite_file):
    suite_file.write_text(SUITE.replace("seeds: 2", "seeds: 1").replace("sparsities: [0.5, 0.9]", "sparsities: [0.9]"))
    results = {}
    for isolate in (False, True):
        db = tmp_path / f"isolate-{isolate}.db"
        summary = run_suite(load_suite(str(suite_file)), db, isolate=isolate, progress=False, echo=lambda line: None)
        assert (summary.ran, summary.failures) == (2, [])
        with Store(db) as store:
            results[isolate] = {run.label: run for run in store.runs()}
    for label, inline in results[False].items():
        isolated = results[True][label]
        assert isolated.config["isolated"] and not inline.config["isolated"] and isolated.setting != inline.setting
        assert (isolated.final.accuracy, isolated.final.loss, isolated.final.layers) == (
            inline.final.accuracy, inline.final.loss, inline.final.layers)
        assert masks_equal(isolated, inline)
        # The run's rise above its start is part of its process's peak (and the peak is really measured).
        assert isolated.cost["process_peak_bytes"] > 0
        assert isolated.cost["peak_memory_bytes"] <= isolated.cost["process_peak_bytes"]
    suite_file.write_text(suite_file.read_text().replace("seeds: 1", "seeds: 1\nisolate: true"))
    assert all(run.config["isolated"] for run in plan(load_suite(str(suite_file))).runs)  # the suite may ask too


def test_a_variants_runs_are_its_own_suite_and_an_unknown_one_is_refused_first(tmp_path, suite_file, capsys):
    suite_file.write_text(SUITE.replace("seeds: 2", "seeds: 1") + "variants:\n  half:\n    sparsities: [0.5]\n")
    db = tmp_path / "runs.db"
    assert main(["bench", "--suite", str(suite_file), "--db", str(db), "--variant", "full"]) == 2
    assert capsys.readouterr().err.strip().endswith("has no variant 'full'; its variants: half") and not db.exists()
    assert main(["bench", "--suite", str(suite_file), "--db", str(db), "--variant", "half"]) == 0
    assert "suite tiny:half: 2 runs" in capsys.readouterr().out
    with Store(db) as store:
        runs = store.runs()
    assert {(run.suite, run.sparsity, run.config["variant"]) for run in runs} == {("tiny:half", 0.5, "half")}
    assert main(["bench", "--list"]) == 0
    assert "variants (--variant)" in capsys.readouterr().out


# ---------------------------------------------------------------- the shipped reproduction suites

def test_dpf_lenet300_quick_runs_from_scratch_beside_its_dense_reference(tmp_path, data_dir):
    suite = load_suite("dpf_lenet300", quick=True, data_dir=data_dir)
    summary = run_suite(suite, tmp_path / "runs.db", data_dir=data_dir, progress=False, echo=lambda line: None)
    assert (summary.ran, summary.failures) == (4, [])
    with Store(tmp_path / "runs.db") as store:
        runs = store.runs()
        reference = store.dense(summary.plan.dense_key)
    assert sorted(run.label for run in runs) == ["dpf", "gmp", "gmp-uniform", "oneshot-ft"]
    assert all(run.config["from_scratch"] and run.config["hparams"]["epochs"] == suite.dense.epochs for run in runs)
    assert all(abs(run.points[-1].sparsity - 0.98) < 1e-4 for run in runs)
    assert reference["train_seconds"] > 0 and reference["accuracy"] > 0.2  # ten classes: above chance


def planned(name: str, data_dir, variant: str | None = None) -> dict[str, set]:
    """label -> {(sparsity, seed)} of the suite's (or its variant's) full plan."""
    runs: dict[str, set] = {}
    for run in plan(load_suite(name, variant=variant, data_dir=data_dir)).runs:
        runs.setdefault(run.label, set()).add((run.sparsity, run.seed))
    return runs


def grid(sparsities, seeds=(0,)) -> set:
    return set(itertools.product(sparsities, seeds))


def test_the_bip_suites_plan_the_issues_comparisons(data_dir):
    levels, seeds = (0.8, 0.9, 0.95, 0.98, 0.99), (0, 1, 2)
    lenet = planned("bip_lenet300", data_dir)
    assert lenet == {**{label: grid(levels, seeds) for label in ("bip-paper", "bip-code", "bip-off", "omp", "hydra",
                                                                  "snip", "grasp", "synflow")},
                     "imp": grid([0.99], seeds)}
    suite = load_suite("bip_lenet300", data_dir=data_dir)
    entries = {entry.label: entry for entry in suite.methods}
    assert {e.hparams["implicit_gradient"] for e in suite.methods if e.method == "bip"} == {"paper", "code", "off"}
    assert all(e.hparams["epochs"] == suite.dense.epochs == 20 for e in suite.methods)  # E = 20 everywhere
    assert {label for label, e in entries.items() if e.from_scratch} == {"imp", "omp", "snip", "grasp", "synflow"}
    assert entries["imp"].measure_recorded and entries["hydra"].hparams["finetune_epochs"] == 20

    for variant, epochs in ((None, 3), ("1epoch", 1), ("full", 100)):
        assert planned("bip_resnet20", data_dir, variant) == {"bip": grid([0.8, 0.95]), "omp": grid([0.8, 0.95]),
                                                              "imp": grid([0.95])}
        suite = load_suite("bip_resnet20", variant=variant, data_dir=data_dir)
        assert suite.checkpoint.name == "resnet20_cifar10.pth.tar" and suite.augment
        assert [e.hparams["epochs"] for e in suite.methods] == [epochs] * 3
        assert suite.device == ("cuda" if variant == "full" else "cpu")
    full = load_suite("bip_resnet20", variant="full", data_dir=data_dir)  # retraining with the official finetune.yml
    assert {e.label: e.hparams["weight_decay"] for e in full.methods} == {"bip": 1e-4, "omp": 5e-4, "imp": 5e-4}

    assert planned("bip_filters", data_dir) == {"bip": grid([0.3, 0.5, 0.7]), "magnitude-ft": grid([0.3, 0.5, 0.7])}
    bip, baseline = (e.budget for e in load_suite("bip_filters", data_dir=data_dir).methods)
    assert bip == baseline and (bip.allocation, bip.structure) == ("uniform", "filters")  # the same for both
    assert bip.layer_sparsity == {r"^fc\.": 0.0}  # the linear layer stays dense


def test_the_dpf_and_chita_suites_plan_the_issues_comparisons(data_dir):
    # DPF as the references run it (mask frozen after the schedule) beside both GMP forms: global, as DPF
    # ranks, and Zhu & Gupta's per-layer "incremental"; on LeNet-5 also DPF with its remedy (clipping).
    for name, epochs, extra in (("dpf_lenet300", 30, ()), ("dpf_lenet5", 20, ("dpf-clip",))):
        assert planned(name, data_dir) == {label: grid([0.9, 0.95, 0.98, 0.99], (0, 1, 2))
                                           for label in ("dpf", "gmp", "gmp-uniform", "oneshot-ft", *extra)}
        suite = load_suite(name, data_dir=data_dir)
        assert suite.from_scratch and suite.dense.epochs == epochs
        assert all(e.hparams["epochs"] == epochs for e in suite.methods)  # the dense row's epochs for every method
        entries = {e.label: e for e in suite.methods}
        assert entries["dpf"].hparams["freeze"] and entries["dpf"].hparams["grad_clip"] is None
        assert (entries["gmp"].budget.allocation, entries["gmp-uniform"].budget.allocation) == ("global", "uniform")
    assert load_suite("dpf_lenet5", data_dir=data_dir).methods[1].hparams["grad_clip"] == 1.0
    for variant, epochs, seeds in ((None, 5, (0,)), ("conv-only", 5, (0,)), ("full", 300, (0, 1, 2))):
        assert planned("dpf_resnet20", data_dir, variant) == {label: grid([0.9], seeds)
                                                              for label in ("dpf", "gmp", "gmp-uniform")}
        suite = load_suite("dpf_resnet20", variant=variant, data_dir=data_dir)
        assert dict(suite.model_options) == {"shortcut": "identity"} and suite.dense.epochs == epochs
        assert all(e.hparams["epochs"] == epochs for e in suite.methods)
        # every layer by default; the reference's convolutions only (fc dense) in conv-only and full
        fc = None if variant is None else {r"^fc\.": 0.0}
        assert all(e.budget.layer_sparsity == fc for e in suite.methods)
    full = load_suite("dpf_resnet20", variant="full", data_dir=data_dir)
    assert full.dense.nesterov and full.device == "cuda" and full.dense.lr_milestones == (0.5, 0.75)
    chita = planned("chita_resnet20", data_dir)
    assert chita == {label: grid([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
                     for label in ("magnitude", "woodfisher", "chita-block", "chita", "chita++")}
    suite = load_suite("chita_resnet20", data_dir=data_dir)
    assert suite.reestimate_bn and suite.holdout == 2000
    assert {e.label: len(e.candidates) for e in suite.methods} == {"magnitude": 1, "woodfisher": 2, "chita-block": 3,
                                                                   "chita": 3, "chita++": 2}
    memory = load_suite("chita_resnet20", variant="memory", data_dir=data_dir)
    assert memory.isolate and planned("chita_resnet20", data_dir, "memory") == {
        label: grid([0.7]) for label in ("woodfisher", "chita-block", "chita", "chita++")}
    mlpnet = load_suite("chita_mlpnet", data_dir=data_dir)
    assert mlpnet.holdout == 5000 and {e.label: len(e.candidates) for e in mlpnet.methods} == {
        "magnitude": 1, "obd": 1, "woodfisher": 4, "woodfisher-1step": 4, "chita": 10, "chita-backsolve": 10,
        "chita++": 2}


@pytest.mark.slow  # two command-line processes
def test_kill_9_mid_suite_then_the_same_command_finishes_it(tmp_path):
    db = tmp_path / "runs.db"
    suite = slow_suite(seeds=3, seconds=0.2)  # 6 runs
    process = start_cli(tmp_path, suite, db)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.OperationalError):  # the tables may not exist yet
            statuses = dict(rows(db, "SELECT status, count(*) FROM runs GROUP BY status")) if db.exists() else {}
            if statuses.get(DONE, 0) >= 2 and statuses.get(RUNNING, 0) == 1:
                break
        time.sleep(0.02)
    else:
        process.kill()
        pytest.fail(f"the bench never got two runs done: {process.communicate()[0]}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = dict(rows(db, "SELECT hash, finished FROM runs WHERE status = 'done'"))
    interrupted = rows(db, "SELECT hash FROM runs WHERE status = 'running'")[0][0]
    assert len(before) >= 2

    again = start_cli(tmp_path, suite, db)
    output = again.communicate(timeout=120)[0]
    assert again.returncode == 0, output
    assert f"{len(before)} already done" in output
    after = {h: (status, finished, attempts) for h, status, finished, attempts in
             rows(db, "SELECT hash, status, finished, attempts FROM runs")}
    assert len(after) == 6 and all(status == DONE for status, _, _ in after.values())
    assert all(after[h][1] == finished and after[h][2] == 1 for h, finished in before.items())  # not redone
    assert after[interrupted][2] == 2  # the interrupted run was redone
    assert rows(db, "SELECT count(*), sum(final) FROM results") == [(6, 6)]


@pytest.mark.slow  # two command-line processes
def test_two_benches_share_a_database_without_running_anything_twice(tmp_path):
    db = tmp_path / "runs.db"
    suite = slow_suite(seeds=5, seconds=0.15)  # 10 runs
    barrier = f"{tmp_path / 'a.ready'},{tmp_path / 'b.ready'}"
    meeting = tmp_path / "meeting"
    meeting.mkdir()  # each process's first run waits for the other's: both work, whatever the scheduling
    first = start_cli(tmp_path, suite, db, barrier, meet=f"{meeting},2")
    second = start_cli(tmp_path, suite, db, ",".join(reversed(barrier.split(","))), meet=f"{meeting},2")
    outputs = [process.communicate(timeout=120)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert rows(db, "SELECT status, count(*), max(attempts) FROM runs GROUP BY status") == [(DONE, 10, 1)]
    assert rows(db, "SELECT count(*) FROM results") == [(10,)]
    owners = {pid for (pid,) in rows(db, "SELECT owner_pid FROM runs")}
    assert owners == {first.pid, second.pid}  # both worked
    assert sum(int(text.split(" run now")[0].rsplit(", ", 1)[1]) for text in outputs) == 10
    assert sum("training the dense" in text for text in outputs) == 1  # the other waited for the cached model


def test_reestimate_bn_runs_once_before_the_methods_and_is_part_of_the_start(tmp_path, suite_file, monkeypatch):
    from prunekit.bench import runner

    passes = []
    monkeypatch.setattr(runner, "reestimate_batch_norm", lambda model, loader, device: passes.append(model) or 3)
    suite = dataclasses.replace(load_suite(str(suite_file), seeds=1), reestimate_bn=True)
    summary = run_suite(suite, tmp_path / "runs.db", progress=False, echo=lambda line: None)
    assert len(passes) == 1 and summary.ran == 4 and not summary.failures
    assert plan(suite).dense_key != plan(dataclasses.replace(suite, reestimate_bn=False)).dense_key


def test_reestimate_bn_on_a_model_without_batch_norm_is_an_error_naming_the_line(tmp_path, suite_file):
    suite_file.write_text(suite_file.read_text().replace("seeds: 2", "seeds: 2\nreestimate_bn: true"))
    with pytest.raises(PrunekitError, match=r"line 10: `reestimate_bn: true` but lenet300 has no batch-norm layer"):
        run_suite(load_suite(str(suite_file)), tmp_path / "runs.db", progress=False, echo=lambda line: None)
