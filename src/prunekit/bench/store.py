"""Bench runs in SQLite: claimed atomically, committed one by one, reclaimed from dead processes.

A run is one (suite, method, hyperparameters, budget, sparsity, seed, code version), named by the
hash of that content. Its life: `pending` → `running` (claimed inside BEGIN IMMEDIATE, so two
processes never claim the same run) → `done` or `failed`. A run left `running` by a process that
no longer exists (same host; the pid and the process start time no longer match) is claimed again;
Ctrl-C puts the run back to `pending`. Each finished run and its results are one transaction,
committed before the next run starts, so an interrupted suite loses at most the run in progress.

A run has one or more result rows: one per sparsity the method recorded on its way (IMP rounds,
multi-stage schedules), then the final result. A run of an entry with `search:` also keeps its
search: the values chosen and every candidate's held-out score. WAL mode lets readers (reports)
work while a bench writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrunekitError

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
SCHEMA_VERSION = 2
# Each schema version's changes to the one before, applied in order to an older database.
MIGRATIONS = {2: "ALTER TABLE runs ADD COLUMN search TEXT"}
BUSY_TIMEOUT_SECONDS = 60
DEFAULT_LOSS = "cross-entropy"  # a suite's objective when it names none (a key of objectives.GRADES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    setting TEXT NOT NULL,        -- hash of what every run of the suite shares: model, data, dense start
    label TEXT NOT NULL,
    method TEXT NOT NULL,
    sparsity REAL NOT NULL,       -- requested
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,         -- JSON of everything hashed
    code_version TEXT NOT NULL,
    status TEXT NOT NULL,
    owner_host TEXT, owner_pid INTEGER, owner_start TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, started REAL, finished REAL,
    cost TEXT,                    -- JSON: PruneResult.cost
    history TEXT,                 -- JSON: PruneResult.history
    environment TEXT,             -- JSON
    error TEXT,
    mask_path TEXT,
    search TEXT                   -- JSON: the values chosen on the held-out data and every candidate's score
);
CREATE INDEX IF NOT EXISTS runs_by_suite ON runs (suite, setting);
CREATE TABLE IF NOT EXISTS results (
    run_hash TEXT NOT NULL REFERENCES runs (hash),
    point INTEGER NOT NULL,       -- order recorded, the final result last
    final INTEGER NOT NULL,
    event TEXT,                   -- JSON: what the method recorded at this point (round, stage, ...)
    sparsity REAL NOT NULL,       -- achieved: zeros / total over the model's Conv and Linear weights
    accuracy REAL NOT NULL,
    loss REAL NOT NULL,
    layers TEXT NOT NULL,         -- JSON {tensor: achieved sparsity}
    macs_dense INTEGER NOT NULL,
    macs INTEGER NOT NULL,        -- with zero weights skipped
    cost TEXT NOT NULL,           -- JSON: cost of the pruning up to this point
    PRIMARY KEY (run_hash, point)
);
CREATE TABLE IF NOT EXISTS dense (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    path TEXT,                    -- the cached weights, for a trained dense model
    accuracy REAL NOT NULL,
    loss REAL NOT NULL,
    macs INTEGER NOT NULL,
    train_seconds REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS suites (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    path TEXT NOT NULL,
    published TEXT NOT NULL,      -- JSON list
    updated REAL NOT NULL
);
"""


def objective_of(config: dict[str, Any]) -> str:
    """The objective a run pruned and was measured with; runs stored before suites named one used the default."""
    return config.get("objective", DEFAULT_LOSS)


def measured_dense_key(dense_key: str, objective: str) -> str:
    """The key of the dense model's measurement under `objective`: one dense start is measured once per objective.
    The default objective's keeps the dense key itself, as it had before suites named an objective."""
    return dense_key if objective == DEFAULT_LOSS else f"{dense_key}:{objective}"


@dataclass(frozen=True)
class Owner:
    """The process running a run: host, pid and the pid's start time (a pid can be reused)."""

    host: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "")

    def is_alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # another machine's process cannot be checked from here
        if Path("/proc/self/stat").exists():
            return _process_start(self.pid) == self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _process_start(pid: int) -> str | None:
    """The start time of a live process from /proc, or None (no such process, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]


@dataclass(frozen=True)
class PlannedRun:
    hash: str
    suite: str
    setting: str
    label: str
    method: str
    sparsity: float
    seed: int
    config: dict[str, Any]
    code_version: str


@dataclass
class Point:
    """One measured state of a pruned model."""

    final: bool
    sparsity: float
    accuracy: float
    loss: float
    layers: dict[str, float]
    macs_dense: int
    macs: int
    cost: dict[str, Any]
    event: dict[str, Any] | None = None


@dataclass
class Outcome:
    points: list[Point]  # the final one last
    cost: dict[str, Any]
    history: list[dict[str, Any]]
    environment: dict[str, Any]
    mask_path: str
    search: dict[str, Any] | None = None  # the values chosen on the held-out data and every candidate's score


@dataclass(frozen=True)
class StoredRun(PlannedRun):
    """A planned run as the database holds it: its state, cost and measured points."""

    status: str
    attempts: int
    owner: Owner | None
    created: float
    started: float | None
    finished: float | None
    cost: dict[str, Any] | None
    history: list[dict[str, Any]]
    environment: dict[str, Any] | None
    error: str | None
    mask_path: str | None
    search: dict[str, Any] | None = None
    points: list[Point] = field(default_factory=list)

    @property
    def final(self) -> Point | None:
        return next((p for p in self.points if p.final), None)


class Store:
    """The runs database; `with Store(path) as store:` closes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise PrunekitError(f"--db {self.path} is a folder; give a file name such as {self.path / 'runs.db'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise PrunekitError(f"{self.path} is not a prunekit runs database ({exc}); pass another --db") from None
        if version > SCHEMA_VERSION:
            raise PrunekitError(f"{self.path} has runs schema {version}, this prunekit writes {SCHEMA_VERSION}; "
                                "use another --db or the prunekit version that wrote it")
        with self._transaction():
            for newer in range(version + 1, SCHEMA_VERSION + 1) if version else ():  # 0: a new database
                self._db.execute(MIGRATIONS[newer])
            for statement in SCHEMA.split(";"):  # (no semicolons in the comments)
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock at once, so read-then-write steps are atomic."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- writing

    def save_suite(self, name: str, description: str, path: str, published: list[dict[str, Any]]) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO suites VALUES (?, ?, ?, ?, ?)",
                       (name, description, path, json.dumps(published), time.time()))

    def register(self, runs: Iterable[PlannedRun]) -> None:
        """Add runs not seen before as pending; labels are presentation, so the current ones win."""
        with self._transaction() as db:
            for run in runs:
                db.execute("INSERT OR IGNORE INTO runs (hash, suite, setting, label, method, sparsity, seed, config, "
                           "code_version, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (run.hash, run.suite, run.setting, run.label, run.method, run.sparsity, run.seed,
                            _json(run.config), run.code_version, PENDING, time.time()))
                db.execute("UPDATE runs SET label = ? WHERE hash = ?", (run.label, run.hash))

    def statuses(self, hashes: Iterable[str]) -> dict[str, str]:
        wanted = list(hashes)
        rows = self._db.execute(f"SELECT hash, status FROM runs WHERE hash IN ({','.join('?' * len(wanted))})",
                                wanted).fetchall()
        return dict(rows)

    def claim(self, run_hash: str, owner: Owner) -> bool:
        """Take a run that is pending, failed, or left running by a dead process; False if it is not free."""
        with self._transaction() as db:
            status, host, pid, start = db.execute(
                "SELECT status, owner_host, owner_pid, owner_start FROM runs WHERE hash = ?", (run_hash,)).fetchone()
            if status == DONE or (status == RUNNING and Owner(host, pid, start).is_alive()):
                return False
            db.execute("UPDATE runs SET status = ?, owner_host = ?, owner_pid = ?, owner_start = ?, started = ?, "
                       "attempts = attempts + 1, error = NULL WHERE hash = ?",
                       (RUNNING, owner.host, owner.pid, owner.start, time.time(), run_hash))
            return True

    def finish(self, run_hash: str, owner: Owner, outcome: Outcome) -> bool:
        """Store a run's results and mark it done, in one transaction; False if the run was taken from us."""
        with self._transaction() as db:
            if not self._owned(run_hash, owner):
                return False
            db.execute("UPDATE runs SET status = ?, finished = ?, cost = ?, history = ?, environment = ?, "
                       "mask_path = ?, search = ? WHERE hash = ?",
                       (DONE, time.time(), _json(outcome.cost), _json(outcome.history), _json(outcome.environment),
                        outcome.mask_path, None if outcome.search is None else _json(outcome.search), run_hash))
            db.execute("DELETE FROM results WHERE run_hash = ?", (run_hash,))
            db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (run_hash, index, int(p.final), None if p.event is None else _json(p.event), p.sparsity, p.accuracy,
                 p.loss, _json(p.layers), p.macs_dense, p.macs, _json(p.cost))
                for index, p in enumerate(outcome.points)])
            return True

    def fail(self, run_hash: str, owner: Owner, error: str, environment: dict[str, Any]) -> None:
        with self._transaction() as db:
            if self._owned(run_hash, owner):
                db.execute("UPDATE runs SET status = ?, finished = ?, error = ?, environment = ? WHERE hash = ?",
                           (FAILED, time.time(), error, _json(environment), run_hash))

    def release(self, run_hash: str, owner: Owner) -> None:
        """Give an interrupted run back, so that the next bench runs it."""
        with self._transaction() as db:
            if self._owned(run_hash, owner):
                db.execute("UPDATE runs SET status = ?, owner_host = NULL, owner_pid = NULL, owner_start = NULL "
                           "WHERE hash = ?", (PENDING, run_hash))

    def _owned(self, run_hash: str, owner: Owner) -> bool:
        row = self._db.execute("SELECT status, owner_host, owner_pid, owner_start FROM runs WHERE hash = ?",
                               (run_hash,)).fetchone()
        return row == (RUNNING, owner.host, owner.pid, owner.start)

    def save_dense(self, key: str, config: dict[str, Any], path: str | None, accuracy: float, loss: float,
                   macs: int, train_seconds: float | None) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO dense VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, _json(config), path, accuracy, loss, macs, train_seconds, time.time()))

    # ---------------------------------------------------------------- reading

    def dense(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT key, config, path, accuracy, loss, macs, train_seconds, created "
                               "FROM dense WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        names = ("key", "config", "path", "accuracy", "loss", "macs", "train_seconds", "created")
        record = dict(zip(names, row))
        record["config"] = json.loads(record["config"])
        return record

    def suites(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT name, description, path, published FROM suites").fetchall()
        return {name: {"description": description, "path": path, "published": json.loads(published)}
                for name, description, path, published in rows}

    def runs(self, suite: str | None = None) -> list[StoredRun]:
        """Every run (of one suite), in the order they were planned, with their result rows."""
        where, args = ("WHERE suite = ?", (suite,)) if suite else ("", ())
        columns = ("hash, suite, setting, label, method, sparsity, seed, config, code_version, status, attempts, "
                   "owner_host, owner_pid, owner_start, created, started, finished, cost, history, environment, "
                   "error, mask_path, search")
        runs = [_stored_run(row) for row in
                self._db.execute(f"SELECT {columns} FROM runs {where} ORDER BY rowid", args).fetchall()]
        by_hash = {run.hash: run for run in runs}
        for row in self._db.execute("SELECT run_hash, final, event, results.sparsity, accuracy, loss, layers, "
                                    "macs_dense, macs, results.cost FROM results JOIN runs ON run_hash = hash "
                                    f"{where} ORDER BY run_hash, point", args).fetchall():
            by_hash[row[0]].points.append(Point(bool(row[1]), row[3], row[4], row[5], json.loads(row[6]), row[7],
                                                row[8], json.loads(row[9]), _load(row[2])))
        return runs


def _stored_run(row: tuple) -> StoredRun:
    (run_hash, suite, setting, label, method, sparsity, seed, config, code_version, status, attempts,
     host, pid, start, created, started, finished, cost, history, environment, error, mask_path, search) = row
    return StoredRun(run_hash, suite, setting, label, method, sparsity, seed, json.loads(config), code_version,
                     status, attempts, Owner(host, pid, start) if host else None, created, started, finished,
                     _load(cost), _load(history) or [], _load(environment), error, mask_path, _load(search))


def settings_text(values: dict[str, Any]) -> str:
    """Hyperparameter values as people read them in reports and logs: `ridge=0.001, first_order=False`."""
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "—"


def _json(value: Any) -> str:
    # default=str: a method's history may hold values JSON has no type for (e.g. a torch.Size)
    return json.dumps(value, sort_keys=True, default=str)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
