"""The results database: one SQLite row per cell, written (and committed) the moment the cell ends."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3

MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE results ADD COLUMN primary_metrics TEXT NOT NULL DEFAULT '{}'",),
    3: ("ALTER TABLE results ADD COLUMN identity TEXT NOT NULL DEFAULT '{}'",),
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
    identity TEXT NOT NULL DEFAULT '{}'
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

    @property
    def cell_key(self) -> str:
        return cell_key(self.kind, self.method, self.params, self.modelpool, self.taskpool, self.seed,
                        self.eval_limit, self.preference, self.identity)

    @property
    def setting_key(self) -> str:
        """The cell key without the versions: rows that differ only in versions are one setting's history."""
        return cell_key(self.kind, self.method, self.params, self.modelpool, self.taskpool, self.seed,
                        self.eval_limit, self.preference)


def cell_key(kind: str, method: str, params: Mapping[str, Any], modelpool: str, taskpool: str, seed: int,
             eval_limit: int | None, preference: Sequence[float] | None,
             identity: Mapping[str, Any] | None = None) -> str:
    """A stable identity for a cell: everything that changes its result, and nothing else. `identity` holds the
    plugin, pool and task-pool versions (recipe hashes, hub revisions); rows written before it existed have none."""
    parts: list[Any] = [kind, method, dict(params), modelpool, taskpool, seed, eval_limit,
                        list(preference) if preference is not None else None]
    if identity:
        parts.append(dict(identity))
    ident = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


_JSON_FIELDS = ("params", "preference", "metrics", "primary_metrics", "extras", "versions", "config", "identity")


class ResultStore:
    """SQLite-backed results; each `put` commits, so an interrupted grid keeps every finished cell."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path))
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            exists = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'results'").fetchone()
            if not exists:
                self.db.execute(f"CREATE TABLE results ({_COLUMNS})")
                self._set_version(SCHEMA_VERSION)
        self._migrate()

    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 1

    def _set_version(self, version: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            from .errors import MergebenchError
            raise MergebenchError(f"results store {self.path} has schema version {version}, newer than this "
                                  f"mergebench understands ({SCHEMA_VERSION}); upgrade mergebench to read it")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.db:  # each step commits whole or not at all
                for statement in MIGRATIONS[target]:
                    self.db.execute(statement)
                self._set_version(target)

    def put(self, result: CellResult) -> None:
        row = asdict(result)
        for f in _JSON_FIELDS:
            row[f] = json.dumps(row[f], default=str)
        row["task_specific"] = int(row["task_specific"])
        row["cell_key"] = result.cell_key
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", row)

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
        cur = self.db.execute(f"SELECT * FROM results {clause}", args)
        names = [d[0] for d in cur.description]
        for values in cur.fetchall():
            row = dict(zip(names, values))
            row.pop("cell_key")
            for f in _JSON_FIELDS:
                row[f] = json.loads(row[f]) if row[f] is not None else None
            row["task_specific"] = bool(row["task_specific"])
            yield CellResult(**row)

    def close(self) -> None:
        self.db.close()
