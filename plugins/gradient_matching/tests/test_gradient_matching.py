"""Gradient matching: the task-arithmetic limit, a hand-computed case, and one run on the embedded pool."""

from __future__ import annotations

import torch

from mergebench_core import PRETRAINED, RunContext
from mergebench_gradient_matching import GradientMatching, Params, gradient_matching_merge


def test_zero_expert_hessians_give_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "n": torch.tensor(2)}
    experts = [{"w": torch.randn(4, 3, generator=g), "n": torch.tensor(2)} for _ in range(3)]
    h0 = {"w": torch.rand(4, 3, generator=g)}
    zeros = [{"w": torch.zeros(4, 3)} for _ in range(3)]
    for alpha in (0.3, 1.0):
        merged = gradient_matching_merge(base, experts, h0, zeros, alpha=alpha, s0=10.0, sts=[5.0, 6.0, 7.0],
                                         delta0=1e-3)
        want = base["w"] + alpha * sum(e["w"] - base["w"] for e in experts)
        torch.testing.assert_close(merged["w"], want)
        assert merged["n"] == 2


def test_hand_computed_case():
    base = {"w": torch.tensor([0.0, 1.0])}
    experts = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 5.0])}]  # τ1 = [2, 0], τ2 = [0, 4]
    h0 = {"w": torch.tensor([1.0, 0.0])}
    hts = [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])}]
    merged = gradient_matching_merge(base, experts, h0, hts, alpha=0.5, s0=2.0, sts=[1.0, 2.0], delta0=1.0)
    # entry 0: prior 2·1+1 = 3; local [3, 2]; H̄ = 0.5·5 + 3 = 5.5; θ = 0 + 0.5·((3+3)/5.5·2 + (2+3)/5.5·0) = 12/11
    # entry 1: prior 0+1 = 1; local [1, 4]; H̄ = 0.5·5 + 1 = 3.5; θ = 1 + 0.5·((1+1)/3.5·0 + (4+1)/3.5·4) = 1 + 20/7
    torch.testing.assert_close(merged["w"], torch.tensor([12 / 11, 1 + 20 / 7]))


def test_runs_on_the_embedded_pool_sharing_fisher_with_fisher_merging(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    out = GradientMatching(Params(n_examples=32)).run(pool, ctx)
    n = len(pool.expert_names)
    assert out.extras["stats_cache"] == {"hits": 0, "misses": 2 * n}  # each expert, and the pretrained per task
    assert out.extras["scaling_factor_pt"] == 1200.0  # the mean training-set size
    again = GradientMatching(Params(n_examples=32, scaling_factor=0.5)).run(pool, ctx)
    assert again.extras["stats_cache"] == {"hits": 2 * n, "misses": 0}
    # a smaller α merges less: the result moves towards the pretrained weights
    base = pool.state_dict(PRETRAINED)["fc1.weight"]
    assert (again.model.fc1.weight - base).norm() < (out.model.fc1.weight - base).norm()
