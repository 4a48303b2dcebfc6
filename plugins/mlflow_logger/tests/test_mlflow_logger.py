"""The MLflow logger: a training cell run through the CLI leaves a run in a local file store whose parameters are the
cell's configuration and whose metric history is its curve, read back through MLflow's own client."""

from __future__ import annotations

import math
import os

import pytest

from mergebench_core.cli import main
from mergebench_core.running.loggers import read_log

plugin = pytest.importorskip("mergebench_mlflow_logger")  # skipped where the plugin is not installed
MlflowLogger, flat_params, tracking_uri = plugin.MlflowLogger, plugin.flat_params, plugin.tracking_uri

POOL = "digits-mlp_TA8"


@pytest.fixture(autouse=True)
def mlflow_switches(monkeypatch):
    """The logger sets MLflow's switches when unset: each test starts without them, and they are dropped after."""
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture()
def trained_cache(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, a trained-model cache of this test's own, MLflow's store in mlflow-store/."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    monkeypatch.setenv("MERGEBENCH_MLFLOW_DIR", str(cli_env / "mlflow-store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # not read: the runs stay in the local store
    return cache


def store_runs(experiment: str = "mergebench") -> tuple[object, list]:
    """(client, runs) of the store the logger writes to, through MLflow's own reading API (the cells may have run in
    worker processes: this one needs MLflow's file-store switch of its own, as a user's `mlflow ui` does)."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # dropped after the test by mlflow_switches
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client, client.search_runs([found.experiment_id])


def curve(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_training_cell_writes_a_run_with_its_parameters_and_curve(trained_cache, cli_env):
    argv = ["run", "-m", "linear_scalarization", "-p", POOL, "--tasks", "digits", "linear_scalarization.steps=4",
            "--logger", "mlflow"]
    assert main(argv) == 0
    assert tracking_uri().startswith("file:") and (cli_env / "mlflow-store").is_dir()
    [jsonl] = (cli_env / "results.logs").glob("*.jsonl")
    client, [run] = store_runs()
    assert run.info.status == "FINISHED" and run.info.run_name == f"linear_scalarization {jsonl.stem[:8]}"
    assert run.data.tags["mergebench.run"] == jsonl.stem and run.data.tags["mergebench.kind"] == "cell"
    params = run.data.params
    assert params["method"] == "linear_scalarization" and params["params.steps"] == "4"
    assert params["params.lr"] == "0.0003" and params["modelpool"] == f"{POOL}[digits]" and params["seed"] == "0"
    assert params["preference_given"] == "None" and params["eval_only"] == "False"
    rows = read_log(jsonl)
    for key in ("loss", "lr", "loss/train/digits"):  # the same numbers as the curve beside the store
        assert curve(client, run.info.run_id, key.replace("/", ".")) == {row["step"]: row[key] for row in rows}
    assert sorted(curve(client, run.info.run_id, "loss")) == [1, 2, 3, 4]


def test_every_computed_cell_gets_a_run_and_each_derived_expert_trained_on_the_way_one_more(trained_cache, cli_env):
    derived = f"{POOL}+finetune(steps=2)"
    assert main(["run", "-m", "task_arithmetic", "-p", derived, "--tasks", "digits", "--logger", "mlflow"]) == 0
    client, runs = store_runs()
    by_kind = {run.data.tags["mergebench.kind"]: run for run in runs}
    assert sorted(by_kind) == ["cell", "derived-expert"]
    expert, cell = by_kind["derived-expert"], by_kind["cell"]
    assert expert.info.run_name == f"derived/{derived}/digits" and expert.info.status == "FINISHED"
    assert expert.data.params == {"pool": derived, "expert": "digits"}
    assert sorted(curve(client, expert.info.run_id, "loss")) == [1, 2]
    assert cell.data.params["method"] == "task_arithmetic" and curve(client, cell.info.run_id, "loss") == {}
    assert main(["run", "-m", "task_arithmetic", "-p", derived, "--tasks", "digits", "--logger", "mlflow"]) == 0
    assert len(store_runs()[1]) == 2  # the cell is reused from the store: no new run


def test_the_cells_outcome_is_logged_and_an_expert_read_from_the_cache_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_MLFLOW_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MERGEBENCH_MLFLOW_EXPERIMENT", "outcomes")
    cached = MlflowLogger(f"derived/{POOL}+finetune/digits", {"pool": f"{POOL}+finetune", "expert": "digits"})
    cached.close()
    assert not (tmp_path / "store").exists() and "MLFLOW_ALLOW_FILE_STORE" not in os.environ


    logger = MlflowLogger("f" * 32, {"method": "ties", "params": {"k": 0.2, "odd key!": [1, 2]}, "seed": 1})
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    logger.log(3, {"loss": 2.0, "acc@1": float("nan")})
    logger.summary({"status": "failed", "error": "ValueError: boom", "mean": 0.5, "normalized_mean": None,
                    "metrics": {"digits": {"accuracy": 0.5, "loss": 1.25}},
                    "versions": {"mergebench": "0.1.0", "mergebench-ties": "0.1.0"}})
    logger.close()
    logger.close()  # closing twice is harmless
    client, [run] = store_runs("outcomes")
    assert run.info.status == "FAILED" and run.data.tags["mergebench.error"] == "ValueError: boom"
    assert run.data.tags["mergebench.status"] == "failed"
    assert run.data.params["params.k"] == "0.2" and run.data.params["params.odd key_"] == "[1, 2]"
    assert run.data.params["versions.mergebench-ties"] == "0.1.0"
    metrics = run.data.metrics
    assert metrics["metrics.digits.accuracy"] == 0.5 and metrics["metrics.digits.loss"] == 1.25
    assert metrics["mean"] == 0.5 and "normalized_mean" not in metrics and math.isnan(metrics["acc_1"])
    assert curve(client, run.info.run_id, "mean") == {3: 0.5}  # at the cell's last step


def test_parameter_names_are_made_acceptable_to_mlflow():
    flat = flat_params({"a": {"b/c": 1, "": None}, "f:g": {"h": [1]}, "i": {}, "..": True, "/": "x" * 7000})
    assert flat == {"a.b.c": "1", "a.": "None", "f_g.h": "[1]", "i": "{}", "__": "True", "_": "x" * 5999 + "…"}
