"""Task pools that take parameters in their name (`--taskpool "lmeval(tasks=a,b)"`) and task pools that score a
model themselves (`evaluation.ScoresModels`), on a tiny in-memory plugin: no lm-eval needed."""

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mergebench_core import PRETRAINED, ModelPool, TaskPool, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.contract.api import MetricSpec, Registration
from mergebench_core.data.evaluation import ScoresModels, evaluate
from mergebench_core.errors import ConfigError
from mergebench_core.pools.params import pool_params
from mergebench_core.results.store import ResultStore


@dataclass(frozen=True)
class SumParams:
    tasks: tuple[str, ...] = ("t0", "t1")
    offset: float = 0.0


class SumTasks(TaskPool):
    """Scores a linear model itself: task tK's "total" is the sum of row K of the weight, plus `offset`."""

    def __init__(self, params: SumParams):
        self.params = params

    @property
    def tasks(self):
        return list(self.params.tasks)

    def metrics(self, task):
        return (MetricSpec("total", higher_is_better=False),)

    def score_model(self, evaluable, *, tasks, limit, device, batch_size, split):
        return {t: {"total": float(evaluable.weight[int(t[1:])].detach().sum()) + self.params.offset} for t in tasks}

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        raise AssertionError("a task pool that scores models itself is never asked for batches")

    def logits(self, model, task, inputs):
        raise AssertionError("nor for logits")


class TwoExperts(ModelPool):
    @property
    def expert_names(self):
        return ["t0", "t1"]

    def load_model(self, name):
        model = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            model.weight.fill_({PRETRAINED: 0.0, "t0": 1.0, "t1": 3.0}[name])
        return model


@pytest.fixture()
def plugin(monkeypatch, tmp_path):
    mod = types.ModuleType("sum_tasks_plugin")

    @hookimpl
    def register_modelpools(register):
        register("two", TwoExperts, "two constant experts")

    @hookimpl
    def register_taskpools(register):
        register("sums", SumTasks, "row sums", params=SumParams)

    mod.register_modelpools, mod.register_taskpools = register_modelpools, register_taskpools
    monkeypatch.setattr(registry_module, "_REGISTRY", registry_module.build_registry(extra_modules=[mod]))
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def test_list_parameters_take_bare_items_after_their_key():
    reg = Registration("sums", SumTasks, "taskpool", params=SumParams)
    (params,) = pool_params(reg, ("tasks=t1", "t0", "offset=2"))
    assert tuple(params.tasks) == ("t1", "t0") and params.offset == 2.0
    (params,) = pool_params(reg, ("tasks=[t1,t0]",))
    assert tuple(params.tasks) == ("t1", "t0")
    (params,) = pool_params(reg, ("tasks=t1",))
    assert tuple(params.tasks) == ("t1",)
    with pytest.raises(ConfigError, match="task pool 'sums': 'x' is not of the form key=value"):
        pool_params(reg, ("offset=1", "x"))


def test_a_task_pool_that_scores_models_itself_is_handed_the_model():
    pool = SumTasks(SumParams())
    assert isinstance(pool, ScoresModels)
    model = TwoExperts().load_model("t1")
    assert evaluate(pool, model, tasks=["t1"]) == {"t1": {"total": 6.0}}


def test_a_run_names_the_task_pool_canonically_and_stores_what_it_scored(plugin, tmp_path):
    assert main(["run", "-m", "simple_average", "-p", "two", "--taskpool", "sums(offset=1,tasks=t0,t1)"]) == 0
    rows = ResultStore(tmp_path / "r.sqlite").all()
    assert {r.taskpool for r in rows} == {"sums(offset=1.0)"}  # the default tasks are left out of the name
    merged = next(r for r in rows if r.method == "simple_average")
    assert merged.metrics == {"t0": {"total": 5.0}, "t1": {"total": 5.0}}  # mean weight 2, 2 per row, +1
    assert merged.primary_metrics["t0"] == {"metric": "total", "higher_is_better": False}
    assert main(["run", "-m", "simple_average", "-p", "two", "--taskpool", "sums(tasks=t1,t0)"]) == 0
    assert "sums(tasks=[t1,t0])" in {r.taskpool for r in ResultStore(tmp_path / "r.sqlite").all()}


def test_list_shows_task_pool_parameters(plugin, capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "Task pool parameters" in out
    assert "  sums: tasks: tuple = [t0,t1], offset: float = 0.0" in out


def test_list_shows_an_empty_string_default_as_quotes():
    @dataclass(frozen=True)
    class Folder:
        path: str = ""

    from mergebench_core.pools.params import describe_params

    assert describe_params(Folder) == 'path: str = ""'
