"""The `mergebench run | leaderboard | show | list` paths a user takes, in process, on the embedded pool."""

import json
import types
from importlib import metadata
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mergebench_core import ModelPool, TaskPool, TensorMergeMethod, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore

POOL = "digits-mlp_TA8"


def stored(tmp_path):
    return ResultStore(tmp_path / "results.sqlite").all()


def test_one_cell_then_rerun_reuses_it(cli_env, capsys):
    assert main(["run", "--method", "ties", "--modelpool", POOL]) == 0
    out = capsys.readouterr().out
    assert "| ties" in out and "| Pretrained" in out and "| Individual (experts)" in out
    rows = stored(cli_env)
    assert sorted(r.method for r in rows) == ["individual", "pretrained", "ties"]
    ties = next(r for r in rows if r.method == "ties")
    assert ties.status == "ok" and ties.params == {"scaling_factor": 0.3, "k": 0.2, "combine": "sum",
                                                   "scope": "global"}
    assert 0.5 < ties.mean < 1.0 and ties.merge_seconds > 0 and ties.peak_memory_mb > 0
    assert ties.normalized_mean == pytest.approx(
        sum(ties.metrics[t]["accuracy"] / next(r for r in rows if r.method == "individual").metrics[t]["accuracy"]
            for t in ties.metrics) / 8)
    assert ties.versions["mergebench-ties"] == metadata.version("mergebench-ties") and "torch" in ties.versions
    created = ties.created_at

    assert main(["run", "--method", "ties", "--modelpool", POOL]) == 0
    again = capsys.readouterr()
    assert again.out == out and "1 cells reused" in again.err
    assert next(r for r in stored(cli_env) if r.method == "ties").created_at == created


def test_same_seed_same_numbers(cli_env, capsys):
    assert main(["run", "--method", "ties", "--modelpool", POOL]) == 0
    first = next(r for r in stored(cli_env) if r.method == "ties").metrics
    assert main(["run", "--method", "ties", "--modelpool", POOL, "--rerun"]) == 0
    assert next(r for r in stored(cli_env) if r.method == "ties").metrics == first


def test_sweep_expands_to_one_cell_per_value(cli_env, capsys):
    assert main(["run", "-m", "task_arithmetic", "-p", POOL, "method.scaling_factor=0.1,0.5"]) == 0
    out = capsys.readouterr().out
    assert "task_arithmetic (scaling_factor=0.1)" in out and "task_arithmetic (scaling_factor=0.5)" in out
    rows = [r for r in stored(cli_env) if r.method == "task_arithmetic"]
    assert sorted(r.params["scaling_factor"] for r in rows) == [0.1, 0.5]
    assert rows[0].mean != rows[1].mean


def test_unknown_names_and_bad_overrides_fail_before_any_work(cli_env, capsys):
    assert main(["run", "--method", "tiez", "--modelpool", POOL]) == 2
    assert "Did you mean 'ties'" in capsys.readouterr().err
    assert main(["run", "--method", "ties", "--modelpool", "digits-mlp_TA9"]) == 2
    assert "Did you mean 'digits-mlp_TA8'" in capsys.readouterr().err
    assert main(["run", "--method", "ties", "--modelpool", POOL, "method.k=abc"]) == 2
    assert "parameter 'k' expects float, got 'abc'" in capsys.readouterr().err
    assert main(["run", "--method", "ties", "--modelpool", POOL, "ties.kk=1"]) == 2
    assert "Did you mean 'k'" in capsys.readouterr().err
    assert stored(cli_env) == []


# -- a third party's pool and methods, registered in process ----------------------------------------------------
@dataclass
class NoParams:
    pass


class Explodes(TensorMergeMethod):
    """Fails on purpose."""

    name = "explodes"
    Params = NoParams

    def merge_tensor(self, key, base, experts):
        raise RuntimeError("boom in merge_tensor")


class TinyPool(ModelPool):
    """Two experts; `mismatch=True` gives the second a different shape."""

    default_taskpool = "tiny_tasks"
    recipe = "r1"
    """What `version_info` reports; a test changes it to stand for a rebuilt pool."""

    def version_info(self):
        return {"tiny_recipe": self.recipe}

    def __init__(self, mismatch=False, nonfinite=False):
        self.mismatch, self.nonfinite = mismatch, nonfinite

    @property
    def expert_names(self):
        return ["t0", "t1"]

    def load_model(self, name):
        torch.manual_seed({"_pretrained_": 0, "t0": 1, "t1": 2}[name])
        model = nn.Linear(3 if (self.mismatch and name == "t1") else 2, 2)
        if self.nonfinite and name == "t0":
            with torch.no_grad():
                model.bias[0] = float("inf")
        return model


class TinyTasks(TaskPool):
    @property
    def tasks(self):
        return ["t0", "t1"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        x = torch.eye(2)
        yield x, torch.tensor([0, 1])

    def logits(self, model, task, inputs):
        return model(inputs)


class NeedsThreeExperts(TensorMergeMethod):
    """Applies only to pools of three experts."""

    name = "needs_three"
    Params = NoParams

    @classmethod
    def unsuitable_for(cls, pool, params):
        return None if len(pool.expert_names) == 3 else f"needs 3 experts, the pool has {len(pool.expert_names)}"

    def merge_tensor(self, key, base, experts):
        return base


def third_party_module():
    mod = types.ModuleType("thirdparty_inprocess")

    @hookimpl
    def register_methods(register):
        register(Explodes)
        register(NeedsThreeExperts)

    @hookimpl
    def register_modelpools(register):
        register("tiny", TinyPool)
        register("tiny-mismatch", lambda: TinyPool(mismatch=True))
        register("tiny-nonfinite", lambda: TinyPool(nonfinite=True))

    @hookimpl
    def register_taskpools(register):
        register("tiny_tasks", TinyTasks)

    mod.register_methods, mod.register_modelpools, mod.register_taskpools = (
        register_methods, register_modelpools, register_taskpools)
    return mod


@pytest.fixture()
def with_third_party(monkeypatch):
    reg = registry_module.build_registry(extra_modules=[third_party_module()])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_every_method_run_skips_inapplicable_ones_but_named_ones_fail(cli_env, monkeypatch, capsys):
    reg = registry_module.build_registry(entry_points=[], extra_modules=[third_party_module()])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    assert main(["run", "-p", "tiny"]) == 1  # explodes fails; needs_three is not applicable and not run
    assert "not run: needs_three on tiny: needs 3 experts, the pool has 2" in capsys.readouterr().err
    assert {r.method for r in stored(cli_env)} == {"pretrained", "individual", "explodes"}
    assert main(["run", "-p", "tiny", "-m", "needs_three"]) == 2  # named: refused before any work, with the reason
    assert "needs_three on tiny: needs 3 experts, the pool has 2" in capsys.readouterr().err


def test_a_failing_cell_is_stored_and_the_grid_goes_on(cli_env, with_third_party, capsys):
    assert main(["run", "-m", "explodes,task_arithmetic", "-p", "tiny"]) == 1
    rows = {r.method: r for r in stored(cli_env)}
    assert rows["explodes"].status == "failed"
    assert rows["explodes"].error == "RuntimeError: boom in merge_tensor"
    assert "merge_tensor" in rows["explodes"].traceback
    assert rows["task_arithmetic"].status == "ok"
    captured = capsys.readouterr()
    assert "FAILED explodes" in captured.out and "1 cell(s) failed" in captured.err
    assert main(["show", "--failed"]) == 0
    assert "boom in merge_tensor" in capsys.readouterr().out


def test_mismatched_pool_names_key_and_shapes(cli_env, with_third_party, capsys):
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny-mismatch"]) == 1
    row = next(r for r in stored(cli_env) if r.method == "task_arithmetic")
    assert "tensor 'weight' has shape [2, 2] in tiny-mismatch/_pretrained_ but [2, 3] in tiny-mismatch/t1" in row.error


def test_non_finite_weights_name_the_tensor(cli_env, with_third_party, capsys):
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny-nonfinite"]) == 1
    row = next(r for r in stored(cli_env) if r.method == "task_arithmetic")
    assert "tensor 'bias' in tiny-nonfinite/t0 has 1 non-finite values" in row.error


@pytest.mark.parametrize("fmt,marker", [("github", "| Method"), ("latex", "\\toprule"), ("html", '<table class="lb">'),
                                        ("csv", "modelpool,taskpool,kind,method"), ("json", '"cell_key"')])
def test_leaderboard_formats(cli_env, capsys, fmt, marker):
    assert main(["run", "-m", "simple_average", "-p", POOL]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert marker in out and ("simple\\_average" if fmt == "latex" else "simple_average") in out
    if fmt == "json":
        assert {r["method"] for r in json.loads(out)} == {"pretrained", "individual", "simple_average"}


def test_list_shows_distribution_and_version(cli_env, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"mergebench-ties {metadata.version('mergebench-ties')}" in out and "digits-mlp_TA8" in out and "digits_TA8" in out


def test_a_changed_pool_recipe_is_a_new_cell_not_a_stale_reuse(cli_env, with_third_party, capsys, monkeypatch):
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 0
    assert "reused" not in capsys.readouterr().err
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 0
    assert "1 cells reused" in capsys.readouterr().err
    monkeypatch.setattr(TinyPool, "recipe", "r2")
    assert main(["run", "-m", "task_arithmetic", "-p", "tiny"]) == 0
    assert "reused" not in capsys.readouterr().err  # the pool changed: nothing of the old recipe is reused
    rows = ResultStore(cli_env / "results.sqlite").all(history=True)
    assert sorted(r.identity["modelpool"]["tiny_recipe"] for r in rows if r.method == "task_arithmetic") == \
        ["r1", "r2"]
    assert {r.identity["modelpool"]["tiny_recipe"] for r in ResultStore(cli_env / "results.sqlite").all()} == {"r2"}


def test_a_reader_that_leaves_early_is_not_an_error():
    # `mergebench list | head -1`: the pipe closes while the CLI still writes
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mergebench_core.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Error" not in err
