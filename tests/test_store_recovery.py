"""The results store when things go wrong: a result kept in the temporary folder comes back, a write that fails does
not stop the grid, damaged numbers and schema versions are named instead of shown, and a folder is called a folder."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sqlite3
import subprocess
import tempfile
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from mergebench_core import ModelPool, TaskPool, hookimpl
from mergebench_core.cli import main
from mergebench_core.contract import registry as registry_module
from mergebench_core.errors import MergebenchError
from mergebench_core.results.pending import pending_dir, temp_pending_dir
from mergebench_core.results.store import CellResult, ResultStore, StoreBusyError

ROOT = Path(__file__).resolve().parent.parent


def _row(method: str, acc: float = 0.5, **kw) -> CellResult:
    return CellResult("method", method, {"k": 1}, "pool", "tasks", metrics={"a": {"accuracy": acc}}, mean=acc, **kw)


@pytest.fixture()
def private_temp(tmp_path, monkeypatch):
    """The temporary folder, as `tempfile` gives it, inside this test's folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _block_pending(path: Path) -> Path:
    """Make `<store>.pending/` impossible to create (a file stands in its place), as on a full disk."""
    blocker = pending_dir(path)
    blocker.write_text("not a folder")
    return blocker


# -- results kept aside ------------------------------------------------------------------------------------------

def test_a_result_kept_in_the_temporary_folder_is_added_at_the_next_open(tmp_path, private_temp, caplog):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, timeout=0.1)
    blocker = _block_pending(path)
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    result = _row("ties", 0.75)
    try:
        with pytest.raises(StoreBusyError) as caught:
            store.put(result)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.close()
    kept = list(temp_pending_dir(path).glob("*.json"))
    assert len(kept) == 1 and str(kept[0]) in str(caught.value)  # the message says where it went
    assert kept[0].is_relative_to(private_temp)

    other = tmp_path / "elsewhere" / "r.sqlite"  # a store of the same name never takes it
    assert ResultStore(other).get(result.cell_key) is None
    assert kept[0].exists()

    blocker.unlink()
    caplog.set_level(logging.INFO, logger="mergebench_core.results.store")
    back = ResultStore(path).get(result.cell_key)
    assert back is not None and back.mean == 0.75 and back.created_at == result.created_at
    assert not temp_pending_dir(path).exists()
    assert any(str(temp_pending_dir(path)) in r.getMessage() and "added 1 result" in r.getMessage()
               for r in caplog.records)


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


@pytest.fixture()
def tiny_env(tmp_path, monkeypatch, private_temp):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.chdir(tmp_path)
    mod = types.ModuleType("store_recovery_tiny")
    mod.register_modelpools = hookimpl(lambda register: register("tiny", TinyPool))
    mod.register_taskpools = hookimpl(lambda register: register("tiny_tasks", TinyTasks))
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[mod]))
    return tmp_path


def test_a_write_that_fails_does_not_stop_the_grid_and_its_result_comes_back(tiny_env, monkeypatch, capsys):
    path = tiny_env / "results.sqlite"
    ResultStore(path).close()
    blocker = _block_pending(path)  # the disk is full: no side file beside the store either
    original = ResultStore._write

    def disk_full_for_task_arithmetic(self, result):
        if result.method == "task_arithmetic":
            return sqlite3.OperationalError("database or disk is full")
        return original(self, result)

    monkeypatch.setattr(ResultStore, "_write", disk_full_for_task_arithmetic)
    assert main(["run", "-m", "task_arithmetic,ties", "-p", "tiny"]) == 1  # the exit status says so
    captured = capsys.readouterr()
    assert "| task_arithmetic" in captured.out and "| ties" in captured.out  # both computed and shown
    assert "database or disk is full" in captured.err and str(temp_pending_dir(path)) in captured.err
    assert "1 computed row(s) could not be written" in captured.err
    stored = {r.method: r for r in ResultStore(path, readonly=True).all()}
    assert set(stored) == {"pretrained", "individual", "ties"}  # the cell after the failed write went on
    kept = [json.loads(f.read_text()) for f in temp_pending_dir(path).glob("*.json")]
    assert [k["method"] for k in kept] == ["task_arithmetic"]

    monkeypatch.setattr(ResultStore, "_write", original)
    blocker.unlink()
    assert main(["run", "-m", "task_arithmetic,ties", "-p", "tiny"]) == 0
    assert "(2 cells reused" in capsys.readouterr().err  # the kept result was added, not recomputed
    stored = {r.method: r for r in ResultStore(path, readonly=True).all()}
    assert stored["task_arithmetic"].created_at == kept[0]["created_at"]
    assert not temp_pending_dir(path).exists()


# -- damaged stores ----------------------------------------------------------------------------------------------

DAMAGE = {
    "nan_metric": "UPDATE results SET metrics = '{\"a\": {\"accuracy\": NaN}}' WHERE method = 'nan_metric'",
    "inf_metric": "UPDATE results SET metrics = '{\"a\": {\"loss\": Infinity}}' WHERE method = 'inf_metric'",
    "inf_preference": "UPDATE results SET preference = '[-Infinity, 1.0]' WHERE method = 'inf_preference'",
    "huge_mean": "UPDATE results SET mean = 1e308 WHERE method = 'huge_mean'",
    "inf_seconds": "UPDATE results SET eval_seconds = 9e999 WHERE method = 'inf_seconds'",
}


def test_rows_with_non_finite_or_absurd_numbers_are_named_and_skipped(tmp_path, capsys, caplog):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    for name in ["ties", *DAMAGE]:
        store.put(_row(name, 0.6, preference=[0.5, 0.5]))
    store.close()
    db = sqlite3.connect(str(path))
    with db:
        for statement in DAMAGE.values():
            db.execute(statement)
    db.close()

    caplog.set_level(logging.WARNING, logger="mergebench_core.results.store")
    ro = ResultStore(path, readonly=True)
    assert [r.method for r in ro.all()] == ["ties"]
    assert len(ro.damaged) == len(DAMAGE)
    reasons = " ".join(ro.damaged.values())
    for column in ("'metrics'", "'preference'", "'mean'", "'eval_seconds'"):
        assert f"column {column}" in reasons
    assert "NaN" in reasons or "nan" in reasons

    for fmt in ("github", "csv", "json", "html", "latex"):
        capsys.readouterr()
        assert main(["leaderboard", "--store", str(path), "--format", fmt]) == 0
        captured = capsys.readouterr()
        assert "ties" in captured.out
        shown = re.sub(r"<script.*?</script>", "", captured.out, flags=re.DOTALL)  # (the page's sorting code)
        assert not re.search(r"\b(nan|-?inf|infinity|1e\+308)\b", shown, re.IGNORECASE), fmt
        assert len([line for line in captured.err.splitlines() if "skipping a damaged row" in line]) == len(DAMAGE)


def test_a_schema_version_that_is_not_a_number_is_a_clear_store_error(tmp_path, capsys):
    path = tmp_path / "r.sqlite"
    ResultStore(path).put(_row("ties"))
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE meta SET value = 'three' WHERE key = 'schema_version'")
    db.close()
    for readonly in (False, True):
        with pytest.raises(MergebenchError, match="schema version .*'three', not a whole number"):
            ResultStore(path, readonly=readonly)
    assert main(["leaderboard", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'three', not a whole number" in err and "unexpected" not in err


def test_a_store_path_that_is_a_folder_is_called_a_folder(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    for readonly in (False, True):
        with pytest.raises(MergebenchError, match="is a folder, not a file") as caught:
            ResultStore(folder, readonly=readonly)
        assert "read-only" not in str(caught.value)
    assert main(["leaderboard", "--store", str(folder)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


# -- what git should not see -------------------------------------------------------------------------------------

def test_git_ignores_the_store_companions_logs_and_kept_results():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["mergebench-results.sqlite", "mergebench-results.sqlite-wal", "mergebench-results.sqlite-shm",
             "mergebench-results.logs/run.jsonl", "mergebench-results.sqlite.pending/x.json", "sub/r.sqlite-wal"]
    done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *names], capture_output=True,
                          text=True, check=False)
    assert sorted(done.stdout.split()) == sorted(names)
