"""The runner's guarantee to methods that declare data (`MethodInfo.data`): they always get a task pool, and a cell that
cannot have one is refused while the grid is planned, before any work, naming the methods and the fix."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mergebench_core import (
    PRETRAINED,
    MergebenchError,
    MergeOutput,
    Method,
    MethodInfo,
    ModelPool,
    RunContext,
    TaskPool,
    hookimpl,
)
from mergebench_core.contract.registry import build_registry
from mergebench_core.results.store import ResultStore
from mergebench_core.running.data_needs import MissingTaskPool, require_task_pool
from mergebench_core.running.runner import Runner, RunOptions
from mergebench_core.training.methods import TrainingMethod


@dataclass
class NoParams:
    pass


class Pool(ModelPool):
    """Two experts of a linear model; with or without a default task pool."""

    name = "lonely"
    default_taskpool = None

    @property
    def expert_names(self):
        return ["a", "b"]

    def load_model(self, name):
        torch.manual_seed({"a": 1, "b": 2, PRETRAINED: 0}[name])
        return nn.Linear(3, 2).eval()


class ScoredPool(Pool):
    name = "scored"
    default_taskpool = "tasks"


class Tasks(TaskPool):
    name = "tasks"

    @property
    def tasks(self):
        return ["a", "b"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.ones(4, 3), torch.zeros(4, dtype=torch.long)

    def logits(self, model, task, inputs):
        return model(inputs)


class Reader(Method):
    """Declares labeled data and reads the task pool without checking it: the runner guarantees it."""

    name, Params, info = "reader", NoParams, MethodInfo(kind="merge", data="labeled")

    def run(self, pool, ctx):
        next(iter(ctx.taskpool.batches("a", "train")))
        return MergeOutput(pool.load_model("a"))


class Peeker(Reader):
    name, info = "peeker", MethodInfo(kind="merge", data="unlabeled")


class Blind(Reader):
    name, info = "blind", MethodInfo(kind="merge", data="none")

    def run(self, pool, ctx):
        return MergeOutput(pool.load_model("a"))


class Trainer(TrainingMethod):
    name, produces = "trainer", "pool"

    def loss(self, model, batches, state):
        raise AssertionError("never trained here")


def _runner(tmp_path, **options):
    plugin = types.ModuleType("lonely_plugin")

    @hookimpl
    def register_methods(register):
        for method in (Reader, Peeker, Blind, Trainer):
            register(method)

    @hookimpl
    def register_modelpools(register):
        register("lonely", Pool)
        register("scored", ScoredPool)

    @hookimpl
    def register_taskpools(register):
        register("tasks", Tasks)

    plugin.register_methods, plugin.register_modelpools, plugin.register_taskpools = \
        register_methods, register_modelpools, register_taskpools
    registry = build_registry(entry_points=[], extra_modules=[plugin])
    return Runner(registry, ResultStore(":memory:"), RunOptions(isolation="none", cache_dir=tmp_path, **options))


def test_a_data_method_without_a_task_pool_is_refused_while_planning(tmp_path):
    runner = _runner(tmp_path, methods=["reader", "peeker", "blind"], modelpools=["lonely"])
    with pytest.raises(MissingTaskPool) as err:
        runner.plan()
    message = str(err.value)
    assert "reader needs labeled training examples (a task pool's train split)" in message
    assert "peeker needs unlabeled inputs of its tasks" in message and "blind" not in message
    assert "for model pool 'lonely'" in message and "pass --taskpool NAME (installed: tasks)" in message


def test_a_data_free_method_without_a_task_pool_is_refused_as_unscorable(tmp_path):
    runner = _runner(tmp_path, methods=["blind"], modelpools=["lonely"])
    with pytest.raises(MergebenchError, match="names no default task pool; pass --taskpool NAME .* cannot be scored"):
        runner.plan()


@pytest.mark.parametrize(("pools", "taskpool"), [(["lonely"], "tasks"), (["scored"], None)])
def test_with_a_task_pool_data_methods_run_and_read_it(tmp_path, pools, taskpool):
    runner = _runner(tmp_path, methods=["reader", "peeker"], modelpools=pools, taskpool=taskpool)
    report = runner.run(runner.plan())
    rows = [r for r in report.results if r.kind == "method"]
    assert len(rows) == 2 and all(r.status == "ok" for r in rows), [r.error for r in rows]


def test_a_derived_pool_needs_a_task_pool_to_train_on(tmp_path):
    runner = _runner(tmp_path, methods=["blind"], modelpools=["lonely+trainer"])
    with pytest.raises(MissingTaskPool, match="trainer needs labeled training examples .* to derive pool "
                                              "'lonely\\+trainer' from: model pool 'lonely' names no default"):
        runner.plan()


def test_outside_the_runner_the_same_rule_refuses_a_context_without_a_task_pool():
    with pytest.raises(MissingTaskPool, match="trainer needs labeled training examples .* pass a RunContext with a "
                                              "taskpool"):
        Trainer().run(ScoredPool(), RunContext())
    tasks = Tasks()
    assert require_task_pool(Reader, tasks) is tasks
