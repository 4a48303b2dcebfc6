"""The core's layer depths (`engine.layers`) and method specs (`contract.composition`), on a registry of two
made-up methods so that nothing here depends on a plugin."""

from dataclasses import dataclass

import pytest
from torch import nn

from mergebench_core import MergeOutput, Method, MethodInfo, PerTaskModels
from mergebench_core.contract.api import Registration, RunContext
from mergebench_core.contract.composition import format_value, parse_spec, run_base
from mergebench_core.contract.registry import Registry
from mergebench_core.engine.layers import layer_depths, numbered_layer
from mergebench_core.errors import ConfigError, MergebenchError


@dataclass
class TrimParams:
    k: float = 0.2
    combine: str = "sum"
    flags: tuple = ()

    def __post_init__(self):
        if not 0 <= self.k <= 1:
            raise ValueError(f"k must be in [0, 1], got {self.k}")


class Trim(Method):
    name = "trim_merge"
    Params = TrimParams
    info = MethodInfo()

    def run(self, pool, ctx):
        return MergeOutput(nn.Linear(1, 1), {"k": self.params.k})


@dataclass
class NoParams:
    pass


class PerTask(Method):
    name = "per_task"
    Params = NoParams
    info = MethodInfo()

    def run(self, pool, ctx):
        return MergeOutput(PerTaskModels({}))


class TaskSpecific(PerTask):
    name = "task_specific"
    info = MethodInfo(task_specific=True)


def registry() -> Registry:
    reg = Registry()
    for cls in (Trim, PerTask, TaskSpecific):
        reg.add(Registration(cls.name, cls, "method", plugin="test", distribution="test-dist", version="0"))
    return reg


def test_numbered_blocks_give_depths_and_others_none():
    keys = ["vision_model.embeddings.patch.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.11.mlp.fc1.weight", "transformer.resblocks.3.attn.in_proj_weight",
            "vision_model.post_layernorm.weight"]
    assert [numbered_layer(k) for k in keys] == [None, 0, 11, 3, None]
    depths = layer_depths(keys)
    assert depths.numbered and depths.count == 12
    assert depths.fraction(keys[1]) == 0.0 and depths.fraction(keys[2]) == 1.0 and depths.fraction(keys[0]) is None


def test_a_model_without_numbered_blocks_counts_its_modules_in_order():
    depths = layer_depths(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight", "norm.bias"])
    assert not depths.numbered and depths.count == 3
    assert [depths.depth[k] for k in depths.depth] == [0, 0, 1, 1, 2, 2]
    assert depths.fraction("fc2.bias") == 0.5


def test_a_spec_resolves_to_every_parameter_sorted_and_is_a_fixed_point():
    reg = registry()
    spec = parse_spec("Trim-Merge( k = 0.1 )", reg)
    assert spec.method is Trim and spec.params.k == 0.1
    assert spec.canonical() == "trim_merge(combine=sum,flags=[],k=0.1)"
    assert parse_spec(spec.canonical(), reg).canonical() == spec.canonical()
    assert list(parse_spec("trim_merge(flags=[a,b])", reg).params.flags) == ["a", "b"]
    assert parse_spec("per_task", reg).canonical() == "per_task"
    assert format_value(True) == "true" and format_value(None) == "null"


@pytest.mark.parametrize("text,words", [
    ("trim_merg", ["x.base='trim_merg'", "Did you mean 'trim_merge'"]),
    ("trim_merge(kk=1)", ["no parameter 'kk'", "Did you mean 'k'", "k: float"]),
    ("trim_merge(k=3)", ["k must be in [0, 1]"]),
    ("trim_merge(k=x)", ["'k'", "float"]),
    ("trim_merge(k)", ["not key=value"]),
    ("trim_merge(k=0.1,,combine=sum)", ["empty parameter"]),
    ("trim_merge k=1", ["write a method name"]),
    ("task_specific", ["one model per task"]),
])
def test_bad_specs_say_what_and_where(text, words):
    with pytest.raises(ConfigError) as err:
        parse_spec(text, registry(), owner="x.base")
    for word in words:
        assert word in str(err.value)


def test_run_base_returns_one_model_and_refuses_other_outputs():
    reg = registry()

    class Pool:
        name, relation, has_pretrained, files_only = "p", "finetuned", True, False

    out = run_base(parse_spec("trim_merge(k=0.5)", reg), Pool(), RunContext())
    assert isinstance(out.model, nn.Module) and out.extras == {"k": 0.5}
    with pytest.raises(MergebenchError, match="PerTaskModels, not one model"):
        run_base(parse_spec("per_task", reg), Pool(), RunContext())


def test_a_default_base_that_is_not_installed_does_not_break_the_leaderboard_labels(monkeypatch):
    """`surgery` defaults to `adamerging_lw`; run with `surgery.base=task_arithmetic` where AdaMerging is not
    installed, its defaults cannot be built, and the table falls back to showing what varies."""
    import mergebench_core.contract.registry as registry_module
    from mergebench_core.contract.composition import canonical_spec
    from mergebench_core.results.labels import installed_defaults

    @dataclass
    class OnBaseParams:
        base: str = "not_installed"

        def __post_init__(self):
            self.base = canonical_spec(self.base, owner="on_base.base")

    class OnBase(Trim):
        name = "on_base"
        Params = OnBaseParams

    reg = registry()
    reg.add(Registration("on_base", OnBase, "method", plugin="test", distribution="test-dist", version="0"))
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    assert OnBaseParams(base="trim_merge").base == "trim_merge(combine=sum,flags=[],k=0.2)"
    assert installed_defaults("on_base") is None
    assert installed_defaults("trim_merge") == {"k": 0.2, "combine": "sum", "flags": ()}
