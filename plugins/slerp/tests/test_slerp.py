"""SLERP against closed-form points on the circle, the colinear fallback, and the two-model rule."""

import math

import pytest
import torch

from mergebench_core import MergebenchError, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_slerp import Params, Slerp

R = math.sqrt(0.5)


def merge(params, experts, base=None):
    out = {}
    merge_sources(Slerp(params), StateDictSource(base, "base") if base is not None else None,
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out["w"]


@pytest.mark.parametrize("v0,v1,t,expected", [
    ([1.0, 0.0], [0.0, 1.0], 0.5, [R, R]),              # unit quarter circle: the midpoint is on the circle
    ([2.0, 0.0], [0.0, 1.0], 0.5, [2 * R, R]),           # Ω = 90°: sin(45°)·v0 + sin(45°)·v1
    ([1.0, 0.0], [0.0, 1.0], 1 / 3, [math.sin(math.pi / 3), math.sin(math.pi / 6)]),  # 30° along a 90° arc
    ([2.0, 0.0], [0.0, 1.0], 0.0, [2.0, 0.0]),           # t = 0: the first model
    ([2.0, 0.0], [0.0, 1.0], 1.0, [0.0, 1.0]),           # t = 1: the second model
    ([1.0, 1.0], [2.0, 2.0], 0.25, [1.25, 1.25]),        # colinear: linear interpolation
    ([1.0, 0.0], [-1.0, 0.0], 0.5, [0.0, 0.0]),          # opposite: |cos Ω| = 1, linear as well
])
def test_closed_form(v0, v1, t, expected):
    out = merge(Params(t=t), [{"w": torch.tensor(v0)}, {"w": torch.tensor(v1)}])
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


def test_uses_raw_weights_not_task_vectors():
    # A base, when given, is ignored: interpolation is between the two models' weights.
    experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    out = merge(Params(), experts, base={"w": torch.tensor([5.0, 5.0])})
    assert torch.allclose(out, torch.tensor([R, R]), atol=1e-6)


def test_needs_exactly_two_models():
    with pytest.raises(MergebenchError, match="exactly two models, but 3 were given"):
        merge(Params(), [{"w": torch.ones(2)}] * 3)
    with pytest.raises(ConfigError, match="models must name exactly two experts"):
        build_params("slerp", Params, {}, parse_overrides(["slerp.models=[a,b,c]"]))
    with pytest.raises(ConfigError, match=r"t must be in \[0, 1\]"):
        build_params("slerp", Params, {}, parse_overrides(["slerp.t=1.5"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    with pytest.raises(MergebenchError, match="exactly two models, but 8 were given: digits"):
        Slerp().run(pool, RunContext(taskpool=taskpool))
    with pytest.raises(MergebenchError, match="not among the models"):
        Slerp(Params(models=["digits", "nope"])).run(pool, RunContext(taskpool=taskpool))
    out = Slerp(Params(models=["digits", "rot90"])).run(pool, RunContext(taskpool=taskpool))
    metrics = evaluate(taskpool, out.model, tasks=["digits", "rot90"])
    assert all(m["accuracy"] > 0.3 for m in metrics.values())  # 10 classes: chance is 0.1


def test_a_grid_over_every_method_skips_slerp_on_pools_without_two_experts():
    from mergebench_slerp import Params as SlerpParams
    from mergebench_slerp import Slerp

    class Pool:
        expert_names = ["a", "b", "c"]

    assert "exactly two models, but 3 were given: a, b, c" in Slerp.refusal(Pool(), SlerpParams())
    assert "['z'], which are not among the models" in Slerp.refusal(Pool(), SlerpParams(models=["a", "z"]))
    assert Slerp.refusal(Pool(), SlerpParams(models=["a", "c"])) is None
