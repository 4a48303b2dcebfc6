"""The W&B logger, offline: a training cell run through the CLI leaves a local run directory whose transaction log
holds the cell's config and its curve, step for step the same as the JSON lines beside the store."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from mergebench_core.cli import main
from mergebench_core.running.loggers import read_log

WandbLogger = pytest.importorskip("mergebench_wandb_logger").WandbLogger  # skipped where the plugin is not installed

POOL = "digits-mlp_TA8"


@pytest.fixture(autouse=True)
def wandb_switches(monkeypatch):
    """The logger turns wandb's error reporting off when unset: each test starts without it, and it is dropped after."""
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "")
    monkeypatch.delenv("WANDB_ERROR_REPORTING")


@pytest.fixture()
def trained_cache(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, a trained-model cache of this test's own, W&B runs under wandb-runs/."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    monkeypatch.setenv("MERGEBENCH_WANDB_DIR", str(cli_env / "wandb-runs"))
    monkeypatch.setenv("WANDB_MODE", "online")  # the logger is offline whatever the environment says
    return cache


def records(path: Path, block: int = 32768):
    """The protobuf records of a `.wandb` transaction log, decoded with wandb's own `Record` message.

    The file is a 7-byte header (`:W&B`, magic, version) and then LevelDB-style log blocks: each chunk has a 7-byte
    header (checksum, little-endian length, type: 1 full, 2 first, 3 middle, 4 last), and a block's tail shorter
    than a header is padding. wandb 0.31 ships no Python reader for it, so this is the framing only.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += room
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def _items(updates) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def read_run(path: Path) -> dict:
    """An offline run's name, config, history rows by step, summary and exit code, from its `.wandb` log."""
    run = {"dir": path.parent, "config": {}, "history": {}, "summary": {}, "exit_code": None}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, project=record.run.project, group=record.run.run_group,
                       job_type=record.run.job_type)
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            row = _items(record.history.item)
            # a row's step is its `_step` item: the record's step field is unset in a row that finish flushed
            run["history"][row.get("_step", record.history.step.num)] = row
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_runs(folder: Path, timeout: float = 60.0) -> list[dict]:
    """Every offline run under folder/wandb. `finish()` can return before wandb's service has written a run's last
    records, so this waits (at most `timeout` seconds) until each log ends with its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [read_run(path) for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))]
        if all(run["exit_code"] is not None for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def test_a_training_cell_writes_an_offline_run_with_its_config_and_curve(trained_cache, cli_env):
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits", "linear_scalarization.steps=4",
            "--logger", "wandb"]
    assert main(argv) == 0
    [jsonl] = (cli_env / "results.logs").glob("*.jsonl")
    [run] = offline_runs(cli_env / "wandb-runs")
    assert run["dir"].name.startswith("offline-run-") and run["exit_code"] == 0
    assert run["project"] == "mergebench" and run["group"] == f"{POOL}[digits]" and run["job_type"] == "cell"
    config = run["config"]
    assert config["mergebench_run"] == jsonl.stem and run["name"] == f"linear_scalarization {jsonl.stem[:8]}"
    assert config["method"] == "linear_scalarization" and config["params"]["steps"] == 4
    assert config["modelpool"] == f"{POOL}[digits]" and config["seed"] == 0 and config["eval_only"] is False
    assert sorted(run["history"]) == [1, 2, 3, 4]
    for row in read_log(jsonl):  # the same numbers as the curve beside the store
        logged = run["history"][row["step"]]
        assert {k: logged[k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}
    assert {"loss", "lr", "loss/train/digits"} <= set(run["history"][1])
    assert run["summary"]["loss"] == read_log(jsonl)[-1]["loss"]


def test_every_computed_cell_gets_a_run_and_each_derived_expert_trained_on_the_way_one_more(trained_cache, cli_env):
    derived = f"{POOL}+finetune(steps=2)"
    assert main(["run", "-m", "task_arithmetic", "-p", derived, "--tasks", "digits", "--logger", "wandb"]) == 0
    runs = {run["job_type"]: run for run in offline_runs(cli_env / "wandb-runs")}
    assert sorted(runs) == ["cell", "derived-expert"]
    expert, cell = runs["derived-expert"], runs["cell"]
    assert expert["name"] == f"derived/{derived}/digits" and expert["group"] == derived
    assert expert["config"]["pool"] == derived and expert["config"]["expert"] == "digits"
    assert sorted(expert["history"]) == [1, 2] and expert["exit_code"] == 0
    assert cell["config"]["method"] == "task_arithmetic" and cell["history"] == {} and cell["exit_code"] == 0
    assert main(["run", "-m", "task_arithmetic", "-p", derived, "--tasks", "digits", "--logger", "wandb"]) == 0
    assert len(offline_runs(cli_env / "wandb-runs")) == 2  # the cell is reused from the store: no new run


def test_the_cells_outcome_goes_to_the_summary_and_an_expert_read_from_the_cache_leaves_no_run(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv("MERGEBENCH_WANDB_DIR", str(tmp_path))
    cached = WandbLogger(f"derived/{POOL}+finetune/digits", {"pool": f"{POOL}+finetune", "expert": "digits"})
    cached.close()
    assert not (tmp_path / "wandb").exists()

    logger = WandbLogger("f" * 32, {"method": "ties", "params": {"k": 0.2}, "modelpool": POOL, "seed": 1})
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # before wandb's service starts
    logger.log(1, {"loss": 2.0, "odd": float("nan")})
    logger.summary({"status": "failed", "error": "ValueError: boom", "mean": 0.5, "normalized_mean": None,
                    "metrics": {"digits": {"accuracy": 0.5, "loss": 1.25}},
                    "versions": {"mergebench": "0.1.0", "mergebench-ties": "0.1.0"}})
    logger.close()
    logger.close()  # closing twice is harmless
    [run] = offline_runs(tmp_path)
    assert run["history"][1]["loss"] == 2.0 and run["history"][1]["odd"] != run["history"][1]["odd"]  # NaN kept
    assert run["summary"]["metrics/digits/accuracy"] == 0.5 and run["summary"]["metrics/digits/loss"] == 1.25
    assert run["summary"]["mean"] == 0.5 and "normalized_mean" not in run["summary"]
    assert run["summary"]["status"] == "failed" and run["summary"]["error"] == "ValueError: boom"
    assert run["config"]["versions"] == {"mergebench": "0.1.0", "mergebench-ties": "0.1.0"}
    assert run["config"]["seed"] == 1 and run["exit_code"] == 1
