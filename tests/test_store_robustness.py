"""The results store with other programs around: WAL, a writer that holds the lock too long (a clear error, and the
computed result kept, not lost), read-only stores (file and folder), and damaged rows (reported once, skipped)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
from torch import nn

from mergebench_core import ModelPool, TaskPool, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.errors import MergebenchError
from mergebench_core.results.store import CellResult, ResultStore, StoreBusyError, pending_dir


def _row(method: str, acc: float = 0.5, **kw) -> CellResult:
    return CellResult("method", method, {"k": 1}, "pool", "tasks", metrics={"a": {"accuracy": acc}}, mean=acc, **kw)


def _holder(path):
    """Another program holding the store's write lock (an open write transaction)."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


def test_the_store_runs_in_wal_mode_and_readers_do_not_wait_for_a_writer(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    store.put(_row("ties"))
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    holder = _holder(path)
    holder.execute("UPDATE results SET method = 'changed'")  # not committed
    try:
        start = time.monotonic()
        assert [r.method for r in ResultStore(path, readonly=True, timeout=30).all()] == ["ties"]
        assert time.monotonic() - start < 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_writer_holding_the_lock_too_long_gives_a_clear_error_and_the_result_is_kept(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, timeout=0.2)
    holder = _holder(path)
    result = _row("ties", 0.75, extras={"learned": [0.1, 0.2]})
    try:
        with pytest.raises(StoreBusyError) as caught:
            store.put(result)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(caught.value)
    assert "stayed locked by another process" in message and "MERGEBENCH_STORE_TIMEOUT" in message
    kept = list(pending_dir(path).glob("*.json"))
    assert len(kept) == 1 and str(kept[0].resolve()) in message  # says exactly where the result is
    assert json.loads(kept[0].read_text())["metrics"] == {"a": {"accuracy": 0.75}}
    assert store.get(result.cell_key) is None
    store.close()

    reopened = ResultStore(path)  # the next writable open adds what was kept aside
    back = reopened.get(result.cell_key)
    assert back is not None and back.mean == 0.75 and back.extras == {"learned": [0.1, 0.2]}
    assert back.created_at == result.created_at
    assert not pending_dir(path).exists()


def test_a_kept_result_never_replaces_a_newer_row_of_the_same_cell(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, timeout=0.1)
    old = _row("ties", 0.5, created_at=1000.0)
    holder = _holder(path)
    try:
        with pytest.raises(StoreBusyError):
            store.put(old)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.put(_row("ties", 0.9, created_at=2000.0))  # recomputed meanwhile
    store.close()
    assert ResultStore(path).get(old.cell_key).mean == 0.9
    assert not pending_dir(path).exists()


def test_timeout_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_STORE_TIMEOUT", "0.25")
    assert ResultStore(tmp_path / "r.sqlite").timeout == 0.25
    monkeypatch.setenv("MERGEBENCH_STORE_TIMEOUT", "soon")
    with pytest.raises(MergebenchError, match="MERGEBENCH_STORE_TIMEOUT='soon' is not a number"):
        ResultStore(tmp_path / "r.sqlite")


# -- `mergebench run` against a locked store ----------------------------------------------------------------------

class TinyPool(ModelPool):
    default_taskpool = "tiny_tasks"

    @property
    def expert_names(self):
        return ["t0", "t1"]

    def load_model(self, name):
        torch.manual_seed({"_pretrained_": 0, "t0": 1, "t1": 2}[name])
        return nn.Linear(2, 2)


class TinyTasks(TaskPool):
    @property
    def tasks(self):
        return ["t0", "t1"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.eye(2), torch.tensor([0, 1])

    def logits(self, model, task, inputs):
        return model(inputs)


def _tiny_module():
    mod = types.ModuleType("store_robustness_tiny")

    @hookimpl
    def register_modelpools(register):
        register("tiny", TinyPool)

    @hookimpl
    def register_taskpools(register):
        register("tiny_tasks", TinyTasks)

    mod.register_modelpools, mod.register_taskpools = register_modelpools, register_taskpools
    return mod


@pytest.fixture()
def tiny_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.chdir(tmp_path)
    reg = registry_module.build_registry(extra_modules=[_tiny_module()])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return tmp_path


def test_run_against_a_locked_store_says_so_and_loses_no_result(tiny_env, monkeypatch, capsys):
    path = tiny_env / "results.sqlite"
    ResultStore(path).close()
    monkeypatch.setenv("MERGEBENCH_STORE_TIMEOUT", "0.2")
    holder = _holder(path)
    try:
        assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert "stayed locked by another process" in err and "results.sqlite.pending" in err
    kept = [json.loads(f.read_text()) for f in pending_dir(path).glob("*.json")]
    assert len(kept) == 3  # every row computed (the grid went on), each kept aside rather than lost

    assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 0  # the lock is gone: the run completes
    rows = ResultStore(path, readonly=True).all()
    assert {r.method for r in rows} == {"pretrained", "individual", "task_arithmetic"}
    reused = next(r for r in rows if r.method == kept[0]["method"])
    assert reused.created_at == kept[0]["created_at"]  # the kept result was used, not recomputed
    assert not pending_dir(path).exists()


# -- read-only stores ---------------------------------------------------------------------------------------------

def _store_with_rows(path):
    store = ResultStore(path)
    store.put(_row("ties", 0.8))
    store.put(_row("task_arithmetic", 0.7))
    store.close()
    return path


def test_leaderboard_show_and_plot_never_write(tmp_path, capsys):
    path = _store_with_rows(tmp_path / "r.sqlite")
    before = path.read_bytes()
    assert main(["leaderboard", "--store", str(path)]) == 0
    assert "| ties" in capsys.readouterr().out
    assert main(["show", "--store", str(path), "--method", "ties"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["mean"] == 0.8
    assert path.read_bytes() == before
    ro = ResultStore(path, readonly=True)
    with pytest.raises(MergebenchError, match="opened read-only"):
        ro.put(_row("x"))
    with pytest.raises(MergebenchError, match="no results store"):
        ResultStore(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def _without_write_permission() -> list[str] | None:
    """A command prefix under which this process's files are not writable to it: nothing for an ordinary user,
    `unshare -U` for root (whose own files then obey their permission bits), None when neither is possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        return None
    try:
        probe = subprocess.run(["unshare", "-U", "true"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["unshare", "-U"] if probe.returncode == 0 else None


def test_a_store_on_a_read_only_file_and_folder_can_be_read(tmp_path):
    prefix = _without_write_permission()
    if prefix is None:
        pytest.skip("cannot take write permission away here (root without user namespaces)")
    folder = tmp_path / "shared"
    folder.mkdir()
    path = _store_with_rows(folder / "r.sqlite")
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    script = tmp_path / "read_it.py"  # one process for the three commands: one start-up
    script.write_text(textwrap.dedent(f"""
        import contextlib, io, json, sys
        from mergebench_core.cli import main
        answers = []
        for args in (["leaderboard"], ["show", "--method", "ties"], ["run", "-m", "ties"]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([*args, "--store", {str(path)!r}])
            answers.append([code, out.getvalue(), err.getvalue()])
        sys.__stdout__.write(json.dumps(answers))
        """))
    try:
        probe = subprocess.run([*prefix, "sh", "-c", f"touch '{folder}/x' 2>/dev/null"], env=env, check=False)
        if probe.returncode == 0:
            pytest.skip("the folder stays writable here")
        done = subprocess.run([*prefix, sys.executable, str(script)], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        board, shown, run = json.loads(done.stdout)
        assert board[0] == 0, board[2][-2000:]
        assert "| ties" in board[1] and "| task_arithmetic" in board[1]
        assert shown[0] == 0 and json.loads(shown[1])[0]["mean"] == 0.8
        assert run[0] == 2 and "cannot open the results store" in run[2]  # writing is refused, clearly
        assert sorted(p.name for p in folder.iterdir()) == ["r.sqlite"]
    finally:
        folder.chmod(stat.S_IRWXU)
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


# -- damaged rows ---------------------------------------------------------------------------------------------------

def test_damaged_rows_are_reported_once_and_skipped(tmp_path, capsys, caplog):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    for name in ("ties", "bad_json", "bad_seed", "bad_metrics", "bad_params"):
        store.put(_row(name, 0.6))
    store.close()
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE results SET metrics = '{\"a\": {\"accuracy\": 0.' WHERE method = 'bad_json'")
        db.execute("UPDATE results SET seed = 'abc' WHERE method = 'bad_seed'")
        db.execute("UPDATE results SET metrics = '\"oops\"' WHERE method = 'bad_metrics'")
        db.execute("UPDATE results SET params = '[1, 2]' WHERE method = 'bad_params'")
    db.close()

    caplog.set_level(logging.WARNING, logger="mergebench_core.results.store")
    ro = ResultStore(path, readonly=True)
    ro.all()
    ro.all()
    assert len([r for r in caplog.records if "damaged row" in r.getMessage()]) == 4  # once per row, not per read
    assert len(ro.damaged) == 4

    capsys.readouterr()
    assert main(["leaderboard", "--store", str(path)]) == 0
    captured = capsys.readouterr()
    assert "| ties" in captured.out and "bad_" not in captured.out
    reported = [line for line in captured.err.splitlines() if line.startswith("WARNING mergebench_core.results.store: skip")]
    assert len(reported) == 4
    assert "column 'metrics' is not valid JSON" in captured.err
    assert "column 'seed' holds str 'abc', expected int" in captured.err
    assert main(["show", "--store", str(path)]) == 0
    assert [c["method"] for c in json.loads(capsys.readouterr().out)] == ["ties"]

    writable = ResultStore(path)  # a damaged cell reads as absent, so a run recomputes and replaces it
    fixed = _row("bad_seed", 0.9)
    writable.put(fixed)
    assert writable.get(fixed.cell_key).mean == 0.9


def test_a_read_only_open_reads_an_older_schema_without_migrating_it(tmp_path):
    path = _store_with_rows(tmp_path / "r.sqlite")
    db = sqlite3.connect(str(path))
    with db:  # as schema version 2 left it: no identity column yet (nor version 4's task order and curve)
        for column in ("identity", "task_order", "curve"):
            db.execute(f"ALTER TABLE results DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    ro = ResultStore(path, readonly=True)
    assert ro.schema_version() == 2
    assert sorted(r.method for r in ro.all()) == ["task_arithmetic", "ties"]
    assert all(r.identity == {} for r in ro.all())
    ro.close()
    assert ResultStore(path).schema_version() == 4  # a writable open migrates, as before
