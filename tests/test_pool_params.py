"""Model pools that take parameters: the name grammar, canonical names, precedence, sweeps and errors, on a tiny
in-memory pool (the embedded digits pool's parameters are tested beside it, in modelpools/digits/tests)."""

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mergebench_core import ModelPool, TaskPool, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.contract.checked_params import CheckedParams
from mergebench_core.contract.config import parse_overrides
from mergebench_core.errors import ConfigError, PluginError
from mergebench_core.pools.params import canonical_filter, canonical_names, canonical_params, format_value
from mergebench_core.pools.views import PoolName
from mergebench_core.running.runner import Runner, RunOptions
from mergebench_core.results.store import ResultStore


@dataclass(frozen=True)
class ScaleParams:
    scale: float = 1.0
    shift: int = 0
    tag: str = "a"


BUILT: list = []


@dataclass(frozen=True)
class BoundedParams(CheckedParams):
    """Frozen, as pool parameters are, with bounds declared beside the fields."""

    scale: float = 1.0
    steps: int = 10
    above = {"scale": 0.0}
    at_least = {"steps": 1}
    at_most = {"scale": 10.0, "steps": 10**6}


class ScalePool(ModelPool):
    """Experts t0, t1: the pretrained linear layer plus `scale` times a fixed direction, `shift` added to the bias."""

    default_taskpool = "scale_tasks"

    def __init__(self, params: ScaleParams):
        self.params = params
        BUILT.append(params)

    @property
    def expert_names(self):
        return ["t0", "t1"]

    def load_model(self, name):
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        with torch.no_grad():
            if name != "_pretrained_":
                model.weight += self.params.scale * (1.0 if name == "t0" else -1.0)
            model.bias += self.params.shift
        return model

    def version_info(self):
        return {"scale_params": repr(self.params)}


BUILD_ATTEMPTS: list = []


class FragilePool(ScalePool):
    """Builds its models on first use, and that build fails above scale 5 (in bounds, like a recipe that diverges)."""

    def load_model(self, name):
        BUILD_ATTEMPTS.append(name)
        if self.params.scale > 5:
            raise RuntimeError("the experts diverged")
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        with torch.no_grad():
            if name != "_pretrained_":
                model.weight += self.params.scale * (1.0 if name == "t0" else -1.0)
        return model


class ScaleTasks(TaskPool):
    @property
    def tasks(self):
        return ["t0", "t1"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.eye(2), torch.tensor([0, 1])

    def logits(self, model, task, inputs):
        return model(inputs)


def plugin(params=ScaleParams):
    mod = types.ModuleType("scale_pool_plugin")

    @hookimpl
    def register_modelpools(register):
        register("scaled", ScalePool, "a pool with parameters", params=params)
        register("plain", lambda: ScalePool(ScaleParams()), "a pool without parameters")
        register("bounded", FragilePool, "a pool with bounded parameters", params=BoundedParams)

    @hookimpl
    def register_taskpools(register):
        register("scale_tasks", ScaleTasks)

    mod.register_modelpools, mod.register_taskpools = register_modelpools, register_taskpools
    return mod


@pytest.fixture()
def registry(monkeypatch):
    reg = registry_module.build_registry(extra_modules=[plugin()])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_the_grammar_takes_base_parameters_before_a_derived_method_and_tasks():
    p = PoolName.parse("digits-mlp_TA8(lr=3e-5)+finetune(steps=100,lr=1e-4)[digits,rot90]")
    assert (p.base, p.base_params, p.method, p.params, p.tasks) == \
        ("digits-mlp_TA8", ("lr=3e-5",), "finetune", ("steps=100", "lr=1e-4"), ("digits", "rot90"))
    assert p.pool == "digits-mlp_TA8(lr=3e-5)"
    assert p.unrestricted == "digits-mlp_TA8(lr=3e-5)+finetune(steps=100,lr=1e-4)"
    assert p.with_tasks(p.tasks) == "digits-mlp_TA8(lr=3e-5)+finetune(steps=100,lr=1e-4)[digits,rot90]"
    assert PoolName.parse("a(x=[1,2],y=1e+5)").base_params == ("x=[1,2]", "y=1e+5")  # lists and exponents whole
    assert PoolName.parse("a+finetune").base_params == () and PoolName.parse("a").pool == "a"
    with pytest.raises(ConfigError, match=r"POOL\(k=v,...\)"):
        PoolName.parse("a(x=1)(y=2)")


def test_canonical_values_have_one_spelling():
    assert format_value(3e-5) == format_value(0.00003) == "3e-05"
    assert [format_value(v) for v in (1.0, 0.0003, 7, True, "sgd", [1, 2.5])] == \
        ["1.0", "0.0003", "7", "true", "sgd", "[1,2.5]"]
    with pytest.raises(ConfigError, match="cannot be part of a pool's name"):
        format_value("a,b")
    assert canonical_params(ScaleParams()) == ()
    assert canonical_params(ScaleParams(tag="b", scale=3e-5)) == ("scale=3e-05", "tag=b")  # sorted, non-default only


def test_names_are_canonical_whatever_the_spelling(registry):
    assert canonical_names(registry, "scaled(scale=3e-5)") == ["scaled(scale=3e-05)"]
    assert canonical_names(registry, "SCALED(shift=2,scale=0.00003)") == ["scaled(scale=3e-05,shift=2)"]
    assert canonical_names(registry, "scaled(scale=1,shift=0)") == ["scaled"]  # defaults: the registered name
    assert canonical_names(registry, "scaled(scale=2)[t0]") == ["scaled(scale=2.0)[t0]"]
    assert canonical_names(registry, "scaled", overrides=parse_overrides(["pool.scale=2e-1,0.2,3"])) == \
        ["scaled(scale=0.2)", "scaled(scale=3.0)"]  # a sweep, duplicates dropped
    assert canonical_names(registry, "scaled", {"scale": 2, "shift": 1}, parse_overrides(["pool.shift=4"])) == \
        ["scaled(scale=2.0,shift=4)"]  # defaults, then the config section, then the overrides
    assert canonical_names(registry, "scaled(shift=5)", {"shift": 1}) == ["scaled(shift=5)"]  # the name last
    assert canonical_filter(registry, "scaled(scale=0.00003)") == "scaled(scale=3e-05)"
    assert canonical_filter(registry, "uninstalled(x=1)") == "uninstalled(x=1)"  # stored rows stay reachable


def test_mistakes_are_refused_with_the_parameter_named(registry):
    with pytest.raises(ConfigError, match=r"no parameter 'scael'. Did you mean 'scale'\?"):
        canonical_names(registry, "scaled(scael=2)")
    with pytest.raises(ConfigError, match="parameter 'shift' expects int, got 'x'"):
        canonical_names(registry, "scaled(shift=x)")
    with pytest.raises(ConfigError, match="'plain' takes no parameters"):
        canonical_names(registry, "plain(scale=2)")
    with pytest.raises(ConfigError, match="given both in the pool's name and as pool.scale"):
        canonical_names(registry, "scaled(scale=2)", overrides=parse_overrides(["pool.scale=3"]))
    with pytest.raises(ConfigError, match="given twice"):
        canonical_names(registry, "scaled(scale=2,scale=3)")


def test_a_pool_declaring_bad_parameters_is_a_broken_plugin():
    reg = registry_module.build_registry(entry_points=[], extra_modules=[])
    for bad, why in ((dict, "must be a dataclass type"), (type("NoDefault", (), {}), "must be a dataclass")):
        with pytest.raises(PluginError, match=why):
            registry_module._validate_pool_params(bad, "modelpool", "x", "p")

    @dataclass
    class Needs:
        lr: float

    with pytest.raises(PluginError, match="need a default for every field"):
        registry_module._validate_pool_params(Needs, "modelpool", "x", "p")
    with pytest.raises(PluginError, match="only model pools and task pools take parameters"):
        registry_module._validate_pool_params(ScaleParams, "logger", "x", "p")
    registry_module._validate_pool_params(ScaleParams, "taskpool", "x", "p")  # task pools take them too
    assert not reg.modelpools


def test_the_runner_builds_the_factory_with_params_and_names_the_pool(registry):
    runner = Runner(registry, None, RunOptions())
    pool = runner.modelpool("scaled(scale=0.5)")
    assert pool.params == ScaleParams(scale=0.5) and pool.name == "scaled(scale=0.5)"
    assert runner.modelpool("scaled").params == ScaleParams() and runner.modelpool("scaled").name == "scaled"
    assert runner.modelpool("plain").name == "plain"
    assert runner.resolve_pool_names(["scaled", "plain"], {"shift": 1}) == ["scaled(shift=1)", "plain"]
    name = "scaled(scale=5e-1)+finetune(steps=2)[t0]"
    (canonical,) = canonical_names(registry, name)
    assert canonical == "scaled(scale=0.5)+finetune(steps=2)[t0]"
    derived = runner.modelpool(canonical)  # the task selection of a derived pool of the variant
    assert derived.inner.base is pool and derived.inner.name == "scaled(scale=0.5)+finetune(steps=2)"
    with pytest.raises(ConfigError, match="no selected model pool has a parameter 'shfit'.*Did you mean 'shift'"):
        runner.resolve_pool_names(["scaled"], None, parse_overrides(["pool.shfit=1"]))
    with pytest.raises(ConfigError, match=r"take no parameters"):
        runner.resolve_pool_names(["plain"], {"shift": 1})


def test_run_stores_variants_apart_and_the_leaderboard_finds_them(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "task_arithmetic", "--isolation", "none"]
    assert main([*args, "-p", "scaled"]) == 0
    assert main([*args, "-p", "scaled(scale=0.00003)"]) == 0
    assert main([*args, "-p", "scaled", "pool.scale=3e-5"]) == 0  # the same pool: reused
    assert "1 cells reused" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modelpool:\n  scale: 3.0e-5\n")
    assert main([*args, "-p", "scaled", "--config", str(cfg)]) == 0
    assert "1 cells reused" in capsys.readouterr().err
    assert main([*args, "-p", "scaled", "pool.shift=1,2"]) == 0  # a sweep: one pool per value
    rows = [r for r in ResultStore(tmp_path / "r.sqlite").all() if r.method == "task_arithmetic"]
    assert sorted(r.modelpool for r in rows) == ["scaled", "scaled(scale=3e-05)", "scaled(shift=1)",
                                                  "scaled(shift=2)"]
    capsys.readouterr()
    assert main(["leaderboard", "-p", "scaled(scale=3e-5)", "--format", "json"]) == 0
    import json
    shown = json.loads(capsys.readouterr().out)
    assert {r["modelpool"] for r in shown} == {"scaled(scale=3e-05)"}
    assert main([*args, "-p", "scaled", "pool.scael=1"]) == 2
    assert "Did you mean 'scale'" in capsys.readouterr().err
    cfg.write_text("modelpol:\n  scale: 1\n")
    assert main([*args, "-p", "scaled", "--config", str(cfg)]) == 2
    assert "Did you mean 'modelpool'" in capsys.readouterr().err


def test_list_shows_each_pools_parameters_with_defaults(registry, capsys):
    assert main(["list"]) in (0, 1)
    out = capsys.readouterr().out
    assert "scaled: scale: float = 1.0, shift: int = 0, tag: str = a" in out


def test_declared_bounds_refuse_values_a_pool_cannot_run_with(registry):
    assert canonical_names(registry, "bounded(scale=10,steps=1000000)") == ["bounded(scale=10.0,steps=1000000)"]
    for given, message in (("scale=1e308", "scale must be at most 10.0, got 1e+308"),
                           ("scale=nan", "scale must be greater than 0.0, got nan"),
                           ("scale=inf", "scale must be at most 10.0, got inf"),
                           ("steps=1000000000000", "steps must be at most 1000000, got 1000000000000"),
                           ("steps=0", "steps must be at least 1, got 0")):
        with pytest.raises(ConfigError) as refused:
            canonical_names(registry, f"bounded({given})")
        assert f"model pool 'bounded': {message}. Parameters of bounded: scale: float = 1.0 (0 < scale <= 10), " \
               f"steps: int = 10 (1 <= steps <= 1000000)" in str(refused.value)


def test_a_pool_out_of_bounds_or_that_cannot_build_is_refused_before_any_cell(registry, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("MERGEBENCH_STORE", str(tmp_path / "r.sqlite"))
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "task_arithmetic", "--isolation", "none", "--seed", "0,1"]
    assert main([*args, "-p", "bounded(scale=1e308)"]) == 2
    assert "scale must be at most 10.0, got 1e+308" in capsys.readouterr().err
    BUILD_ATTEMPTS.clear()
    assert main([*args, "-p", "bounded(scale=6)"]) == 2
    err = capsys.readouterr().err
    assert "model pool 'bounded(scale=6.0)' (seed 0) cannot be built: RuntimeError: the experts diverged" in err
    assert "Nothing was run or stored" in err
    assert BUILD_ATTEMPTS == ["_pretrained_"]  # one attempt, not one per reference row, cell and seed
    assert not (tmp_path / "r.sqlite").exists()
    assert main([*args, "-p", "bounded(scale=5)"]) == 0  # a pool that builds runs as before


def test_list_shows_declared_bounds(registry, capsys):
    assert main(["list"]) in (0, 1)
    assert "bounded: scale: float = 1.0 (0 < scale <= 10), steps: int = 10 (1 <= steps <= 1000000)" in \
        capsys.readouterr().out
