"""The task-order axis of continual methods: orders as seeded permutations, one cell per order with its curve of
seen-task scores, tables averaging over orders, the figure, and the store migration that keeps old stores open."""

from __future__ import annotations

import json
import sqlite3
import types
from dataclasses import dataclass

import pytest
import torch

from mergebench_core import ContinualMethod, MethodInfo, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.errors import ConfigError
from mergebench_core.results.store import CellResult, ResultStore, cell_key
from mergebench_core.running.task_order import order_seeds, permutation

POOL = "digits-mlp_TA8"


@dataclass
class Params:
    pass


class RunningMean(ContinualMethod):
    """τ̂_t = (t·τ̂_{t−1} + τ_t)/(t + 1): after the last arrival the plain mean of the task vectors, in any order."""

    name = "running_mean"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def absorb(self, step, key, merged, tau, is_matrix):
        return (step * merged + tau) / (step + 1)


@pytest.fixture()
def with_running_mean(monkeypatch):
    mod = types.ModuleType("continual_test_plugin")

    @hookimpl
    def register_methods(register):
        register(RunningMean)

    mod.register_methods = register_methods
    reg = registry_module.build_registry(extra_modules=[mod])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_orders_are_seeded_permutations():
    names = [f"e{i}" for i in range(8)]
    assert permutation(names, 0) == names
    p1 = permutation(names, 1)
    assert sorted(p1) == names and p1 != names and permutation(names, 1) == p1
    assert permutation(names, 2) != p1
    assert order_seeds() == (0,) and order_seeds(3) == (0, 1, 2) and order_seeds(2, [7, 1]) == (0, 1, 7)
    with pytest.raises(ConfigError, match="at least one order"):
        order_seeds(0)
    with pytest.raises(ConfigError, match="≥ 0"):
        permutation(names, -1)


def test_steps_on_state_dicts_give_the_running_mean():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor(4)}
    experts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
               for _ in range(3)]
    out = RunningMean().steps(base, experts)
    assert set(out[0]) == {"w", "b"}  # integer buffers are not merged
    for t in range(3):
        for k in ("w", "b"):
            torch.testing.assert_close(out[t][k], sum(e[k] - base[k] for e in experts[:t + 1]) / (t + 1))


def test_one_cell_per_order_with_its_curve_and_one_table_row(cli_env, with_running_mean, capsys):
    assert main(["run", "-m", "running_mean,simple_average", "-p", POOL, "--task-orders", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("| running_mean") == 1  # the orders are one row, averaged
    store = ResultStore(cli_env / "results.sqlite")
    rows = {r.task_order: r for r in store.all() if r.method == "running_mean"}
    assert sorted(rows) == [0, 1, 2]
    assert len({store_key(r) for r in rows.values()}) == 3
    individual = next(r for r in store.all() if r.method == "individual")
    average = next(r for r in store.all() if r.method == "simple_average")
    assert average.task_order is None and average.curve is None
    tasks = list(individual.metrics)
    for order, row in rows.items():
        assert row.status == "ok" and len(row.curve) == 8
        assert [step["expert"] for step in row.curve] == row.extras["task_order"] == \
            permutation(rows[0].extras["task_order"], order)
        seen = [step["tasks"][-1] for step in row.curve]
        assert sorted(seen) == sorted(tasks) and (seen == tasks) == (order == 0)
        # step 0 is the first expert itself, scored on its own task
        first = row.curve[0]
        assert first["tasks"] == [seen[0]]
        assert first["mean"] == pytest.approx(individual.metrics[seen[0]]["accuracy"])
        # every step scores exactly the tasks seen so far; the last is the cell's own evaluation
        assert all(step["tasks"] == seen[:t + 1] for t, step in enumerate(row.curve))
        assert row.curve[-1]["mean"] == pytest.approx(row.mean)
        # the running mean ends at the plain average of the experts, whatever the order
        assert row.mean == pytest.approx(average.mean, abs=2e-3)
    assert rows[1].curve[1]["mean"] != rows[0].curve[1]["mean"]

    assert main(["run", "-m", "running_mean", "-p", POOL, "--task-orders", "3"]) == 0
    assert "3 cells reused" in capsys.readouterr().err
    assert main(["run", "-m", "running_mean", "-p", POOL, "--task-order", "5"]) == 0
    assert sorted(r.task_order for r in ResultStore(cli_env / "results.sqlite").all()
                  if r.method == "running_mean") == [0, 1, 2, 5]


def test_plot_continual_draws_the_mean_curve(cli_env, with_running_mean, capsys):
    pytest.importorskip("matplotlib")
    assert main(["run", "-m", "running_mean", "-p", POOL, "--task-orders", "2"]) == 0
    assert main(["plot", "continual", "--out", str(cli_env / "curve.png")]) == 0
    png = (cli_env / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_plot_continual_without_curves_says_what_to_run(cli_env, capsys):
    assert main(["run", "-m", "task_arithmetic", "-p", POOL]) == 0
    assert main(["plot", "continual"]) == 2
    assert "no stored continual results" in capsys.readouterr().err


def store_key(row: CellResult) -> str:
    return row.cell_key


V3_COLUMNS = """cell_key TEXT PRIMARY KEY, kind TEXT NOT NULL, method TEXT NOT NULL, params TEXT NOT NULL,
    modelpool TEXT NOT NULL, taskpool TEXT NOT NULL, preference TEXT, seed INTEGER NOT NULL, eval_limit INTEGER,
    metrics TEXT NOT NULL, primary_metrics TEXT NOT NULL DEFAULT '{}', mean REAL, normalized_mean REAL,
    merge_seconds REAL, peak_memory_mb REAL, eval_seconds REAL, status TEXT NOT NULL, error TEXT, traceback TEXT,
    extras TEXT NOT NULL, versions TEXT NOT NULL, config TEXT NOT NULL, task_specific INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, identity TEXT NOT NULL DEFAULT '{}'"""


def test_a_version_3_store_gains_the_order_and_curve_columns(tmp_path):
    path = tmp_path / "v3.sqlite"
    db = sqlite3.connect(str(path))
    db.execute(f"CREATE TABLE results ({V3_COLUMNS})")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    key = cell_key("method", "ties", {"k": 0.2}, POOL, "digits_TA8", 0, None, None, {"plugin": "x==1"})
    row = dict(cell_key=key, kind="method", method="ties", params='{"k": 0.2}', modelpool=POOL,
               taskpool="digits_TA8", preference=None, seed=0, eval_limit=None,
               metrics=json.dumps({"digits": {"accuracy": 0.9}}), primary_metrics="{}", mean=0.9,
               normalized_mean=None, merge_seconds=1.0, peak_memory_mb=1.0, eval_seconds=1.0, status="ok", error=None,
               traceback=None, extras="{}", versions="{}", config="{}", task_specific=0, created_at=1.0,
               identity='{"plugin": "x==1"}')
    db.execute(f"INSERT INTO results ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)})", row)
    db.commit()
    db.close()

    store = ResultStore(path)
    assert store.schema_version() == 4
    old = store.get(key)
    assert old is not None and old.task_order is None and old.curve is None and old.cell_key == key
    new = CellResult("method", "opcm", {}, POOL, "digits_TA8", task_order=2,
                     curve=[{"step": 0, "expert": "a", "tasks": ["a"], "mean": 0.5, "metrics": {}}])
    store.put(new)
    back = store.get(new.cell_key)
    assert back.task_order == 2 and back.curve == new.curve
    assert new.cell_key != CellResult("method", "opcm", {}, POOL, "digits_TA8", task_order=3).cell_key
    assert CellResult("method", "opcm", {}, POOL, "digits_TA8").cell_key == \
        cell_key("method", "opcm", {}, POOL, "digits_TA8", 0, None, None)
