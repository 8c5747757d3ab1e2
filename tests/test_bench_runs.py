"""Bench runs: stored once, resumed after kill -9 or Ctrl-C, shared safely by concurrent processes."""
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from prunekit.bench import Store, load_suite, run_suite
from prunekit.bench.store import DONE, PENDING, RUNNING, Owner
from prunekit.methods import _REGISTRY, Method

SUITE = """\
name: tiny
model: lenet300
dataset: synthetic
train_size: 600
test_size: 200
dense: {epochs: 2, lr: 0.05, batch_size: 64}
sparsities: [0.5, 0.9]
seeds: 2
methods:
  - method: magnitude
  - method: random
"""

# The command line, with one extra method that takes its time, so that a run can be caught in progress.
SLOW_CLI = """\
import pathlib, sys, time
from dataclasses import dataclass, field
from prunekit.methods import register

@dataclass(frozen=True)
class SlowHparams:
    seconds: float = field(default=0.3, metadata={"help": "pause before scoring"})

@register("slow-test", SlowHparams, "magnitude after a pause (tests)")
def slow(ctx, hp):
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


def start_cli(tmp_path, suite_text: str, db, barrier: str = "-") -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    suite = tmp_path / "slow.yaml"
    suite.write_text(suite_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    first = start_cli(tmp_path, suite, db, barrier)
    second = start_cli(tmp_path, suite, db, ",".join(reversed(barrier.split(","))))
    outputs = [process.communicate(timeout=120)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert rows(db, "SELECT status, count(*), max(attempts) FROM runs GROUP BY status") == [(DONE, 10, 1)]
    assert rows(db, "SELECT count(*) FROM results") == [(10,)]
    owners = {pid for (pid,) in rows(db, "SELECT owner_pid FROM runs")}
    assert owners == {first.pid, second.pid}  # both worked
    assert sum(int(text.split(" run now")[0].rsplit(", ", 1)[1]) for text in outputs) == 10
    assert sum("training the dense" in text for text in outputs) == 1  # the other waited for the cached model
