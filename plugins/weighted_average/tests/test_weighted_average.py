"""Weighted averaging against hand-computed sums, with and without normalisation."""

import pytest
import torch

from mergebench_core import MergebenchError, RunContext
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_weighted_average import Params, WeightedAverage

EXPERTS = [{"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([0.0, 8.0])}]


def merge(params, experts=EXPERTS):
    method = WeightedAverage(params)
    out = {}
    merge_sources(method, None, [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out["w"], method.extras


@pytest.mark.parametrize("params,expected", [
    (Params(), [2.0, 4.0]),                                        # equal weights: the mean
    (Params(weights=[1.0, 3.0]), [1.0, 6.0]),                      # normalized to 0.25, 0.75
    (Params(weights=[0.5, 0.25], normalize=False), [2.0, 2.0]),    # used as given
    (Params(weights=[2.0, -1.0]), [8.0, -8.0]),                    # extrapolation: 2·e0 − e1
])
def test_hand_computed(params, expected):
    out, extras = merge(params)
    assert torch.allclose(out, torch.tensor(expected))
    assert len(extras["weights"]) == 2


def test_identical_experts_are_returned_whatever_the_normalized_weights():
    e = {"w": torch.randn(3, 3)}
    out, _ = merge(Params(weights=[0.7, 0.3]), [e, e])
    assert torch.allclose(out, e["w"], atol=1e-6)


def test_weights_must_match_the_experts():
    with pytest.raises(MergebenchError, match="weights has 3 entries but there are 2 experts"):
        merge(Params(weights=[1.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="sum to zero"):
        build_params("weighted_average", Params, {}, parse_overrides(["weighted_average.weights=[1,-1]"]))


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    weights = [1.0] * len(pool.expert_names)
    weights[0] = 5.0  # favour the first expert (task "digits")
    out = WeightedAverage(Params(weights=weights)).run(pool, RunContext(taskpool=taskpool))
    uniform = WeightedAverage().run(pool, RunContext(taskpool=taskpool))
    first = pool.task_of(pool.expert_names[0])
    favoured = evaluate(taskpool, out.model, tasks=[first])[first]["accuracy"]
    plain = evaluate(taskpool, uniform.model, tasks=[first])[first]["accuracy"]
    assert favoured > plain
