"""MagMax against a hand-computed selection, including ties in magnitude and zero task vectors."""

import torch

from mergebench_core import RunContext
from mergebench_core.data.evaluation import evaluate
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource
from mergebench_magmax import MagMax, Params


def merge(params, base, experts):
    out = {}
    merge_sources(MagMax(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out


def test_selects_the_largest_magnitude_and_later_experts_win_ties():
    # τ1 = [1, -3, 2, 0], τ2 = [-2, 1, -2, 0], τ3 = [0.5, 3, 1, 0]
    # entry 0: |-2| largest -> -2;  entry 1: |-3| = |3|, the later (τ3) wins -> 3
    # entry 2: |2| = |-2|, the later (τ2) wins -> -2;  entry 3: all zero -> 0;   λ = 0.5
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    taus = [[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.0], [0.5, 3.0, 1.0, 0.0]]
    out = merge(Params(), base, [{"w": base["w"] + torch.tensor(t)} for t in taus])
    assert torch.allclose(out["w"], torch.tensor([0.0, 2.5, 0.0, 1.0]))


def test_single_expert_is_task_arithmetic_and_lambda_one_returns_it():
    base = {"w": torch.randn(3, 3)}
    expert = {"w": torch.randn(3, 3)}
    out = merge(Params(scaling_factor=1.0), base, [expert])
    assert torch.allclose(out["w"], expert["w"], atol=1e-6)


def test_zero_task_vectors_return_the_base():
    base = {"w": torch.randn(4, 2)}
    out = merge(Params(), base, [base, base, base])
    assert torch.equal(out["w"], base["w"])


def test_on_the_embedded_pool(digits_pools):
    pool, taskpool = digits_pools
    out = MagMax().run(pool, RunContext(taskpool=taskpool))
    metrics = evaluate(taskpool, out.model)
    pretrained = evaluate(taskpool, pool.load_model("_pretrained_"))
    mean = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    assert mean > sum(m["accuracy"] for m in pretrained.values()) / len(pretrained)
