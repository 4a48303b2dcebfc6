"""The results store's numbered migrations: a version-1 store (built by hand, as mergebench wrote it before the
`primary_metrics` column) opens, reads back, migrates once and takes new rows; a newer store is refused."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mergebench_core.errors import MergebenchError
from mergebench_core.results.store import MIGRATIONS, SCHEMA_VERSION, CellResult, ResultStore, cell_key

# The schema of version 1, as mergebench wrote it (written out here, not derived from the current code).
V1_COLUMNS = """
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
    created_at REAL NOT NULL
"""

OLD = dict(kind="method", method="ties", params={"k": 0.2, "scaling": 0.4}, modelpool="digits-mlp_TA8",
           taskpool="digits_TA8", preference=None, seed=3, eval_limit=100,
           metrics={"digits": {"accuracy": 0.91, "loss": 0.3}, "rot90": {"accuracy": 0.85, "loss": 0.5}},
           mean=0.88, normalized_mean=0.93, merge_seconds=1.5, peak_memory_mb=12.0, eval_seconds=0.25,
           status="ok", error=None, traceback=None, extras={"note": "old"}, versions={"mergebench": "0.1"},
           config={"grid": "x"}, task_specific=True, created_at=1000.0)


def _v1_store(path, version_row: str | None = "1") -> str:
    """A store as version 1 left it, holding one row (OLD)."""
    key = cell_key(OLD["kind"], OLD["method"], OLD["params"], OLD["modelpool"], OLD["taskpool"], OLD["seed"],
                   OLD["eval_limit"], OLD["preference"])
    db = sqlite3.connect(str(path))
    db.execute(f"CREATE TABLE results ({V1_COLUMNS})")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    if version_row is not None:
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version_row,))
    row = dict(OLD, cell_key=key, task_specific=int(OLD["task_specific"]))
    for f in ("params", "preference", "metrics", "extras", "versions", "config"):
        row[f] = json.dumps(row[f])
    cols = ", ".join(row)
    db.execute(f"INSERT INTO results ({cols}) VALUES ({', '.join(':' + c for c in row)})", row)
    db.commit()
    db.close()
    return key


def _columns(path) -> list[str]:
    db = sqlite3.connect(str(path))
    try:
        return [r[1] for r in db.execute("PRAGMA table_info(results)")]
    finally:
        db.close()


def _stored_version(path) -> str | None:
    db = sqlite3.connect(str(path))
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return row[0] if row else None
    finally:
        db.close()


def test_schema_version_matches_the_migrations():
    assert SCHEMA_VERSION == 4
    assert sorted(MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1))


@pytest.mark.parametrize("version_row", ["1", None], ids=["meta-says-1", "no-version-row"])
def test_a_version_1_store_is_migrated_and_reads_back(tmp_path, version_row):
    path = tmp_path / "old.sqlite"
    key = _v1_store(path, version_row)
    assert "primary_metrics" not in _columns(path)

    store = ResultStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert "primary_metrics" in _columns(path) and "identity" in _columns(path)

    old = store.get(key)
    assert old is not None
    assert old.primary_metrics == {} and old.identity == {}
    for name, value in OLD.items():
        assert getattr(old, name) == value, name
    assert old.cell_key == key
    assert [r.cell_key for r in store.all()] == [key]

    # new rows, with primary metrics, go in beside the old one
    new = CellResult(kind="method", method="task_arithmetic", params={"scaling": 0.3}, modelpool="glue-pool",
                     taskpool="glue", metrics={"cola": {"accuracy": 0.7, "matthews_corrcoef": 0.2}},
                     primary_metrics={"cola": {"metric": "matthews_corrcoef", "higher_is_better": True}},
                     mean=0.2, created_at=2000.0)
    store.put(new)
    got = store.get(new.cell_key)
    assert got is not None
    assert got.primary_metrics == {"cola": {"metric": "matthews_corrcoef", "higher_is_better": True}}
    assert got.metrics == new.metrics
    assert [r.method for r in store.all()] == ["ties", "task_arithmetic"]
    store.close()
    assert _stored_version(path) == str(SCHEMA_VERSION)


def test_reopening_a_migrated_store_is_idempotent(tmp_path):
    path = tmp_path / "old.sqlite"
    key = _v1_store(path)
    ResultStore(path).close()
    columns = _columns(path)

    for _ in range(2):  # a second migration would fail on the duplicate column
        store = ResultStore(path)
        assert store.schema_version() == SCHEMA_VERSION
        assert store.get(key).primary_metrics == {}
        assert len(store.all()) == 1
        store.close()
    assert _columns(path) == columns
    assert columns.count("primary_metrics") == 1 and columns.count("identity") == 1


def test_a_fresh_store_starts_at_the_current_version(tmp_path):
    path = tmp_path / "sub" / "new.sqlite"
    store = ResultStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    store.put(CellResult(kind="reference", method="pretrained", params={}, modelpool="p", taskpool="t",
                         metrics={"a": {"accuracy": 0.5}}))
    store.close()
    store = ResultStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert [r.method for r in store.all()] == ["pretrained"]
    store.close()


def test_a_newer_store_is_refused(tmp_path):
    path = tmp_path / "future.sqlite"
    key = _v1_store(path, str(SCHEMA_VERSION + 1))
    with pytest.raises(MergebenchError, match="upgrade") as err:
        ResultStore(path)
    assert str(SCHEMA_VERSION + 1) in str(err.value)
    assert str(path) in str(err.value)
    # nothing was changed: no migration ran, the version stands
    assert "primary_metrics" not in _columns(path)
    assert _stored_version(path) == str(SCHEMA_VERSION + 1)
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT cell_key FROM results").fetchall() == [(key,)]
    db.close()


def test_a_changed_version_is_a_new_cell_and_tables_show_the_newest(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")

    def row(recipe, created, acc):
        return CellResult("method", "ties", {"k": 0.2}, "pool", "tasks", created_at=created,
                          identity={"plugin": "mergebench-ties==0.1.0", "modelpool": {"recipe": recipe}},
                          metrics={"a": {"accuracy": acc}})

    old, new = row("v1", 1.0, 0.5), row("v2", 2.0, 0.6)
    assert old.cell_key != new.cell_key and old.setting_key == new.setting_key
    store.put(old)
    store.put(new)
    assert [r.metrics["a"]["accuracy"] for r in store.all()] == [0.6]
    assert [r.metrics["a"]["accuracy"] for r in store.all(history=True)] == [0.5, 0.6]
