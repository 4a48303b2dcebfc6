"""One question before a method runs, `Method.refusal(pool, params)`: the runner and `merge` ask only it, and plugins
written against the older pair (`cannot_run_on(pool)`, `unsuitable_for(pool, params)`) keep refusing what they
refused, whichever name a caller uses."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mergebench_core import MergeOutput, Method, MethodInfo, ModelPool, TaskPool, TensorMergeMethod, hookimpl
from mergebench_core.contract.registry import build_registry
from mergebench_core.engine.file_merges import CheckpointFiles, file_merge_refusal
from mergebench_core.errors import ConfigError
from mergebench_core.results.store import ResultStore
from mergebench_core.running.runner import Runner, RunOptions


@dataclass
class Params:
    limit: int = 3


class Pool(ModelPool):
    """`n` experts of a linear model."""

    name, default_taskpool = "few", "tasks"

    def __init__(self, n: int = 2, relation: str = "finetuned"):
        self.n, self.relation = n, relation

    @property
    def expert_names(self):
        return [f"e{i}" for i in range(self.n)]

    def load_model(self, name):
        torch.manual_seed(0)
        return nn.Linear(2, 2).eval()


class Tasks(TaskPool):
    name = "tasks"

    @property
    def tasks(self):
        return ["e0", "e1", "e2", "e3"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.ones(4, 2), torch.zeros(4, dtype=torch.long)

    def logits(self, model, task, inputs):
        return model(inputs)


class OldStyle(Method):
    """Written against the previous README: overrides both older questions and calls their supers."""

    name, Params, info = "old_style", Params, MethodInfo(task_vectors=True)

    @classmethod
    def cannot_run_on(cls, pool):
        return "no pool named 'never'" if pool.name == "never" else super().cannot_run_on(pool)

    @classmethod
    def unsuitable_for(cls, pool, params):
        if len(pool.expert_names) > params.limit:
            return f"at most {params.limit} experts; raise old_style.limit"
        return super().unsuitable_for(pool, params)

    def run(self, pool, ctx):
        return MergeOutput(pool.load_model("e0"))


class NewStyle(Method):
    name, Params, info = "new_style", Params, MethodInfo()

    @classmethod
    def refusal(cls, pool, params):
        return "odd pools only" if len(pool.expert_names) % 2 == 0 else super().refusal(pool, params)

    def run(self, pool, ctx):
        return MergeOutput(pool.load_model("e0"))


class OldOnNew(NewStyle):
    """An older-style override on a base written with `refusal`: both are heard."""

    name = "old_on_new"

    @classmethod
    def cannot_run_on(cls, pool):
        return "not five" if len(pool.expert_names) == 5 else super().cannot_run_on(pool)


def test_the_default_refusal_hears_the_older_overrides():
    assert OldStyle.refusal(Pool(4), Params()) == "at most 3 experts; raise old_style.limit"
    assert OldStyle.refusal(Pool(4), Params(limit=4)) is None
    never = Pool(1)
    never.name = "never"
    assert OldStyle.refusal(never, Params()) == "no pool named 'never'"
    assert "works on task vectors" in OldStyle.refusal(Pool(1, relation="independent"), Params())


def test_callers_of_the_older_names_get_the_whole_answer():
    assert NewStyle.cannot_run_on(Pool(2)) == "odd pools only"
    assert NewStyle.unsuitable_for(Pool(2), Params()) == "odd pools only"
    assert NewStyle.unsuitable_for(Pool(3), Params()) is None
    assert OldStyle.unsuitable_for(Pool(4), Params()) == "at most 3 experts; raise old_style.limit"
    assert OldOnNew.refusal(Pool(2), Params()) == "odd pools only"
    assert OldOnNew.refusal(Pool(5), Params()) == "not five"
    assert OldOnNew.cannot_run_on(Pool(5)) == "not five" and OldOnNew.refusal(Pool(3), Params()) is None


class Tiny(TensorMergeMethod):
    name, Params, requires_base = "tiny_avg", Params, True

    def merge_tensor(self, key, base, experts):
        return base


def test_checkpoint_files_are_asked_the_same_question():
    assert Tiny.refusal(CheckpointFiles(["a", "b"], has_base=True), Params()) is None
    assert "give the pretrained checkpoint" in Tiny.refusal(CheckpointFiles(["a", "b"], has_base=False), Params())
    assert "cannot merge files" in NewStyle.refusal(CheckpointFiles(["a"], has_base=True), Params())
    assert file_merge_refusal(Tiny) is None and "cannot merge files" in file_merge_refusal(OldStyle)


class Slow(Method):
    name, Params, info = "slow", Params, MethodInfo(left_out_of_sweeps="trains for an hour")

    def run(self, pool, ctx):
        return MergeOutput(pool.load_model("e0"))


def _runner(tmp_path, methods):
    plugin = types.ModuleType("refusal_plugin")

    @hookimpl
    def register_methods(register):
        register(OldStyle)
        register(NewStyle)
        register(Slow)

    @hookimpl
    def register_modelpools(register):
        register("four", lambda: Pool(4))

    @hookimpl
    def register_taskpools(register):
        register("tasks", Tasks)

    plugin.register_methods, plugin.register_modelpools, plugin.register_taskpools = (
        register_methods, register_modelpools, register_taskpools)
    registry = build_registry(entry_points=[], extra_modules=[plugin])
    return Runner(registry, ResultStore(":memory:"), RunOptions(isolation="none", cache_dir=tmp_path, methods=methods,
                                                                  modelpools=["four"]))


def test_the_runner_refuses_named_methods_and_lists_swept_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        _runner(tmp_path, ["old_style"]).plan()
    assert "old_style on four: at most 3 experts; raise old_style.limit" in str(err.value)
    runner = _runner(tmp_path, None)
    assert not [c for c in runner.plan() if c.method in ("old_style", "new_style")]
    assert any("old_style on four: at most 3 experts" in line for line in runner.not_applicable)
    assert any("new_style on four: odd pools only" in line for line in runner.not_applicable)


def test_a_method_left_out_of_sweeps_runs_only_when_named(tmp_path):
    swept = _runner(tmp_path, None)
    assert not [c for c in swept.plan() if c.method == "slow"]
    assert "slow on every pool: trains for an hour; name it with --method to run it" in swept.not_applicable
    assert [c.method for c in _runner(tmp_path, ["slow"]).plan()] == ["slow"]
