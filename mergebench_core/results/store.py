"""The results database: one SQLite row per cell, written (and committed) the moment the cell ends."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergebench_core.errors import MergebenchError
from mergebench_core.results.pending import (
    keep_aside,
    pending_dir,  # noqa: F401  (callers import it from here, where it was)
    pending_folders,
)
from mergebench_core.results.stored_rows import JSON_FIELDS, DamagedRow, decode_row

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE results ADD COLUMN primary_metrics TEXT NOT NULL DEFAULT '{}'",),
    3: ("ALTER TABLE results ADD COLUMN identity TEXT NOT NULL DEFAULT '{}'",),
    4: ("ALTER TABLE results ADD COLUMN task_order INTEGER",
        "ALTER TABLE results ADD COLUMN curve TEXT"),
}
"""SQL that takes a store from version n-1 to n, applied in order when a store is opened; a store without a version
(or version 1) is version 1. Never edit a migration that has shipped: add the next number."""

_COLUMNS = """
    cell_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    params TEXT NOT NULL,
    modelpool TEXT NOT NULL,
    taskpool TEXT NOT NULL,
    preference TEXT,
    seed INTEGER NOT NULL,
    eval_limit INTEGER,
    metrics TEXT NOT NULL,
    primary_metrics TEXT NOT NULL DEFAULT '{}',
    mean REAL,
    normalized_mean REAL,
    merge_seconds REAL,
    peak_memory_mb REAL,
    eval_seconds REAL,
    status TEXT NOT NULL,
    error TEXT,
    traceback TEXT,
    extras TEXT NOT NULL,
    versions TEXT NOT NULL,
    config TEXT NOT NULL,
    task_specific INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    identity TEXT NOT NULL DEFAULT '{}',
    task_order INTEGER,
    curve TEXT
"""


@dataclass
class CellResult:
    """One cell of the grid: a method configuration (or a reference model) on a (model pool, task pool)."""

    kind: str  # "method" or "reference"
    method: str  # method name, or "pretrained" / "individual" for reference rows
    params: dict[str, Any]
    modelpool: str
    taskpool: str
    seed: int = 0
    eval_limit: int | None = None
    preference: list[float] | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    primary_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """{task: {"metric": name, "higher_is_better": bool}}: the metric tables and fronts use for each task; a task
    missing here uses accuracy (higher is better)."""
    mean: float | None = None
    normalized_mean: float | None = None
    merge_seconds: float | None = None
    peak_memory_mb: float | None = None
    eval_seconds: float | None = None
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    traceback: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    task_specific: bool = False
    created_at: float = field(default_factory=time.time)
    identity: dict[str, Any] = field(default_factory=dict)
    """The versions of what produced the numbers, beyond the names: {"plugin": "dist==version", "modelpool": the
    pool's version_info(), "taskpool": the task pool's}. Part of the cell key, so a changed recipe is a new cell."""
    task_order: int | None = None
    """For a continual method (`mergebench_core.contract.continual`): the order seed its experts arrived in (0: the
    pool's own order, `running.task_order`); None for every other row. Part of the cell key."""
    curve: list[dict[str, Any]] | None = None
    """For a continual method: after each step t, {"step": t, "expert": the expert merged at t, "tasks": the tasks
    seen so far, "mean": their mean primary score, "metrics": {task: {metric: value}}}."""

    @property
    def cell_key(self) -> str:
        return cell_key(self.kind, self.method, self.params, self.modelpool, self.taskpool, self.seed,
                        self.eval_limit, self.preference, self.identity, task_order=self.task_order)

    @property
    def setting_key(self) -> str:
        """The cell key without the versions: rows that differ only in versions are one setting's history."""
        return cell_key(self.kind, self.method, self.params, self.modelpool, self.taskpool, self.seed,
                        self.eval_limit, self.preference, task_order=self.task_order)


def cell_key(kind: str, method: str, params: Mapping[str, Any], modelpool: str, taskpool: str, seed: int,
             eval_limit: int | None, preference: Sequence[float] | None,
             identity: Mapping[str, Any] | None = None, *, task_order: int | None = None) -> str:
    """A stable identity for a cell: everything that changes its result, and nothing else. `identity` holds the
    plugin, pool and task-pool versions (recipe hashes, hub revisions); rows written before it existed have none.
    `task_order` (continual methods only) is added only when set, so every other key is what it always was."""
    parts: list[Any] = [kind, method, dict(params), modelpool, taskpool, seed, eval_limit,
                        list(preference) if preference is not None else None]
    if identity:
        parts.append(dict(identity))
    if task_order is not None:
        parts.append({"task_order": int(task_order)})
    ident = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


TIMEOUT_ENV = "MERGEBENCH_STORE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
"""Seconds a write waits for another process that holds the store's write lock (SQLite's busy timeout); a write
that still cannot go through is retried once more before its result is kept aside (see `ResultStore.put`)."""
WRITE_ATTEMPTS = 2


class StoreBusyError(MergebenchError):
    """The results store stayed locked by another process for longer than the timeout."""


def store_timeout() -> float:
    """`$MERGEBENCH_STORE_TIMEOUT` seconds, else `DEFAULT_TIMEOUT`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise MergebenchError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise MergebenchError(f"{TIMEOUT_ENV}={raw!r}: give a number of seconds >= 0")
    return value


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class ResultStore:
    """SQLite-backed results; each `put` commits, so an interrupted grid keeps every finished cell.

    The store runs in WAL mode, so readers never wait for a writer and concurrent runs can share one store; a write
    waits up to `timeout` seconds (`$MERGEBENCH_STORE_TIMEOUT`, default 60) for another process's write lock.
    `readonly=True` opens it with SQLite's `mode=ro` (for `leaderboard`, `show`, `plot`): nothing is created,
    migrated or written, and a store on a read-only file or folder can be read. A damaged row (a column that is not
    valid JSON, or a value of the wrong type) is reported once and skipped; `damaged` maps its key to the reason.
    """

    def __init__(self, path: str | Path, readonly: bool = False, timeout: float | None = None):
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = store_timeout() if timeout is None else float(timeout)
        self.damaged: dict[str, str] = {}
        if self.path.is_dir():
            raise MergebenchError(f"the results store {self.path} is a folder, not a file; pass --store (or set "
                                  f"MERGEBENCH_STORE to) a file path such as {self.path / 'mergebench-results.sqlite'}")
        if readonly:
            self.db = self._open_readonly()
            self._has_results = self._table_exists("results")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise self._too_new(version)
            return
        memory = str(self.path) == ":memory:"
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=self.timeout)
            if not memory:
                self.db.execute("PRAGMA journal_mode=WAL")  # readers never block on a writer, nor it on them
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                exists = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'results'").fetchone()
                if not exists:
                    self.db.execute(f"CREATE TABLE results ({_COLUMNS})")
                    self._set_version(SCHEMA_VERSION)
            self._migrate()
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise StoreBusyError(f"the results store {self.path} stayed locked by another process for "
                                     f"{self.timeout:g} s, so it could not be opened; close the other program or "
                                     f"set {TIMEOUT_ENV} to wait longer") from None
            raise MergebenchError(f"cannot open the results store {self.path} for writing: {exc} (a read-only "
                                  f"store can be read by `mergebench leaderboard`/`show`; pass --store to write "
                                  f"somewhere else)") from None
        self._has_results = True
        if not memory:
            self._import_pending()

    # -- opening ---------------------------------------------------------------------------------------------
    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise MergebenchError(f"no results store at {self.path}")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=self.timeout)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.Error as exc:
            # A WAL store in a folder this user cannot write (no -shm file to share) opens only as immutable.
            log.debug("opening %s read-only failed (%s); opening it as immutable", self.path, exc)
        try:
            db = sqlite3.connect(uri + "&immutable=1", uri=True)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.Error as exc:
            raise MergebenchError(f"cannot read the results store {self.path}: {exc}") from None

    def _table_exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None

    def schema_version(self) -> int:
        if self.readonly and not self._table_exists("meta"):
            return 1
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if not row:
            return 1
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise MergebenchError(f"the results store {self.path} is damaged: its schema version (table meta, key "
                                  f"'schema_version') is {row[0]!r}, not a whole number. Restore the file from a "
                                  f"copy, or start a new store with --store") from None

    def _set_version(self, version: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))

    def _too_new(self, version: int) -> MergebenchError:
        return MergebenchError(f"results store {self.path} has schema version {version}, newer than this "
                               f"mergebench understands ({SCHEMA_VERSION}); upgrade mergebench to read it")

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.db:  # each step commits whole or not at all
                for statement in MIGRATIONS[target]:
                    self.db.execute(statement)
                self._set_version(target)

    # -- writing ---------------------------------------------------------------------------------------------
    def put(self, result: CellResult) -> None:
        """Write one result and commit. If the store stays locked (another process holding its write lock past the
        timeout, twice) or cannot be written at all, the result is kept in a side file, added to the store the next
        time it is opened for writing, and a `MergebenchError` says where it is."""
        if self.readonly:
            raise MergebenchError(f"the results store {self.path} was opened read-only")
        failure = self._write(result)
        if failure is None:
            return
        what = f"the result of {result.method} on {result.modelpool} (seed {result.seed})"
        try:
            kept = f"It is kept in {self._keep_aside(result)} and is added to the store the next time mergebench " \
                   f"opens it for writing (the next `mergebench run`)."
        except OSError as exc:
            kept = f"Keeping it aside failed too ({exc}); it is lost."
        if failure is not None and _is_busy(failure):
            raise StoreBusyError(
                f"the results store {self.path} stayed locked by another process for {WRITE_ATTEMPTS} x "
                f"{self.timeout:g} s, so {what} was not written to it. {kept} Close the program that holds the store "
                f"open for writing, or set {TIMEOUT_ENV} to wait longer.")
        raise MergebenchError(f"cannot write to the results store {self.path} ({failure}), so {what} was not "
                              f"written to it. {kept}")

    def _write(self, result: CellResult) -> sqlite3.Error | None:
        """Insert (or replace) `result`'s row, retrying once when the store is locked; the error, if it failed."""
        row = asdict(result)
        for f in JSON_FIELDS:
            row[f] = json.dumps(row[f], default=str)
        row["task_specific"] = int(row["task_specific"])
        row["cell_key"] = result.cell_key
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        failure: sqlite3.Error | None = None
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.db:
                    self.db.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", row)
                return None
            except sqlite3.Error as exc:
                failure = exc
                if not _is_busy(exc):
                    break
                if attempt + 1 < WRITE_ATTEMPTS:
                    log.warning("the results store %s is locked by another process; waiting up to %g s more",
                                self.path, self.timeout)
        return failure

    def _keep_aside(self, result: CellResult) -> Path:
        """Write `result` as JSON beside the store (or in the temporary folder when that is not writable)."""
        text = json.dumps(asdict(result), default=str, indent=1)
        return keep_aside(self.path, f"{result.cell_key}-{time.time_ns()}.json", text)

    def _import_pending(self) -> None:
        """Add results earlier runs kept aside (see `put`), from beside the store and from the temporary folder."""
        for folder in pending_folders(self.path):
            if not self._import_folder(folder):
                return

    def _import_folder(self, folder: Path) -> bool:
        """Add the results kept in `folder`; a newer stored row of the same cell wins. False when the store refused a
        write (the rest waits for the next open)."""
        added = 0
        for file in sorted(folder.glob("*.json")):
            try:
                result = CellResult(**json.loads(file.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("cannot read the kept-aside result %s (%s); left in place", file, exc)
                continue
            try:
                stored = self.get(result.cell_key)
            except MergebenchError as exc:
                log.warning("could not add the kept-aside result %s to %s yet: %s", file, self.path, exc)
                return False
            failure = self._write(result) if stored is None or stored.created_at <= result.created_at else None
            if failure is not None:
                log.warning("could not add the kept-aside result %s to %s yet: %s", file, self.path, failure)
                return False
            file.unlink()
            added += 1
        if added:
            log.info("added %d result(s) kept aside in %s to the results store %s", added, folder, self.path)
        try:
            folder.rmdir()
        except OSError:
            pass
        return True

    # -- reading ---------------------------------------------------------------------------------------------
    def get(self, key: str) -> CellResult | None:
        rows = list(self._query("WHERE cell_key = ?", (key,)))
        return rows[0] if rows else None

    def all(self, modelpool: str | None = None, taskpool: str | None = None, *,
            history: bool = False) -> list[CellResult]:
        """Stored rows, oldest first. Without `history`, only the newest row of each setting: a cell recomputed
        after its pool's recipe or its plugin changed replaces the older numbers in tables."""
        where, args = [], []
        if modelpool:
            where.append("modelpool = ?")
            args.append(modelpool)
        if taskpool:
            where.append("taskpool = ?")
            args.append(taskpool)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = list(self._query(clause + " ORDER BY created_at", tuple(args)))
        if history:
            return rows
        newest: dict[str, CellResult] = {}
        for r in rows:
            newest.pop(r.setting_key, None)  # re-insert: order follows each setting's newest row
            newest[r.setting_key] = r
        return list(newest.values())

    def _query(self, clause: str, args: tuple) -> Iterator[CellResult]:
        if not self._has_results:
            return
        try:
            cur = self.db.execute(f"SELECT rowid AS _rowid, * FROM results {clause}", args)
            fetched = cur.fetchall()
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise StoreBusyError(f"the results store {self.path} stayed locked by another process for "
                                     f"{self.timeout:g} s; set {TIMEOUT_ENV} to wait longer") from None
            raise MergebenchError(f"cannot read the results store {self.path}: {exc}") from None
        names = [d[0] for d in cur.description]
        for values in fetched:
            row = dict(zip(names, values))
            rowid = row.pop("_rowid")
            key = row.pop("cell_key")
            try:
                yield _decode(row)
            except DamagedRow as exc:
                label = key if isinstance(key, str) else f"rowid {rowid}"
                if label not in self.damaged:
                    self.damaged[label] = str(exc)
                    log.warning("skipping a damaged row of the results store %s (cell %s): %s", self.path, label,
                                exc)

    def close(self) -> None:
        self.db.close()


def _decode(row: dict[str, Any]) -> CellResult:
    """A stored row as a `CellResult`, or `DamagedRow` naming the first column that is not what it should be."""
    fields = decode_row(row)
    try:
        return CellResult(**fields)
    except TypeError as exc:  # a column this version does not know
        raise DamagedRow(str(exc)) from None
