"""Model Stock against closed-form ratios for two and three experts, and its guards."""

import math

import pytest
import torch

from mergebench_core import MergebenchError, RunContext
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_model_stock import ModelStock


def merge(base, experts, method=None):
    method = method or ModelStock()
    out = {}
    merge_sources(method, StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out


def test_two_experts_at_45_degrees():
    # τ1 = [1, 0], τ2 = [1, 1]: cos = 1/√2, t = 2c / (1 + c) = 2(√2 − 1); θ = θ0 + t·mean τ = θ0 + t·[1, 0.5]
    base = {"w": torch.tensor([3.0, -1.0])}
    experts = [{"w": base["w"] + torch.tensor([1.0, 0.0])}, {"w": base["w"] + torch.tensor([1.0, 1.0])}]
    method = ModelStock()
    out = merge(base, experts, method)
    t = 2 * (math.sqrt(2) - 1)
    assert torch.allclose(out["w"], base["w"] + t * torch.tensor([1.0, 0.5]))
    assert method.extras["ratio"]["w"] == pytest.approx(t)


def test_three_experts_use_the_mean_pairwise_cosine():
    # τ = [1,0,0], [0,1,0], [1,1,0]: cosines 0, 1/√2, 1/√2 -> c = √2/3; t = 3c / (1 + 2c); mean τ = [2/3, 2/3, 0]
    base = {"w": torch.zeros(3)}
    experts = [{"w": torch.tensor(v)} for v in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0])]
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    assert torch.allclose(merge(base, experts)["w"], t * torch.tensor([2 / 3, 2 / 3, 0.0]))


def test_identical_experts_return_the_expert():
    base = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    expert = {k: v + torch.randn_like(v) for k, v in base.items()}
    out = merge(base, [expert, expert, expert])
    assert all(torch.allclose(out[k], expert[k], atol=1e-6) for k in base)


def test_orthogonal_updates_and_zero_task_vectors_give_the_base():
    base = {"w": torch.tensor([1.0, 2.0])}
    out = merge(base, [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 3.0])}])  # τ ⟂: t = 0
    assert torch.allclose(out["w"], base["w"])
    assert torch.equal(merge(base, [base, base])["w"], base["w"])


def test_opposite_updates_are_clamped_to_the_base():
    base = {"w": torch.zeros(2)}
    method = ModelStock()
    out = merge(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}], method)
    assert torch.equal(out["w"], base["w"]) and method.extras["negative_cosine_tensors"] == 1


def test_one_expert_is_refused():
    with pytest.raises(MergebenchError, match="at least two fine-tuned models"):
        merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}])


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    out = ModelStock().run(pool, RunContext(taskpool=taskpool))
    metrics = evaluate(taskpool, out.model)
    mean = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    assert 0.1 < mean <= 1.0 and all(0.0 <= t <= 1.0 for t in out.extras["ratio"].values())
