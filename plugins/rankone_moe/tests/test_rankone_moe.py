"""Rank-One MoE: at full rank with a constant router it is task arithmetic; its factors rebuild τ; parity with
FusionBench 0.2.33's `RankOneMoE` (forward and one entropy step's gradients); a run on the embedded pool."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mergebench_rankone_moe import Params, RankOneMoE, rank_one_factors
from torch import nn

from mergebench_core import RunContext
from mergebench_core.upscaling import RankOneBlock, Router, count_parameters, entropy_loss, task_vectors


class MLP(nn.Module):
    def __init__(self, d: int = 6, h: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.mlp = MLP(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.mlp(x)).mean(1)


def experts_of(model, n, seed=0):
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        e = copy.deepcopy(model)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        out.append(e)
    return out


def test_factors_rebuild_each_task_vector_at_full_rank():
    taus = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    u, sv = rank_one_factors(taus, 32)
    assert u.shape == (12, 5) and sv.shape == (12, 4)
    for t in range(3):
        torch.testing.assert_close(u[4 * t:4 * t + 4].T @ sv[4 * t:4 * t + 4], taus[t], atol=1e-5, rtol=1e-5)


def test_full_rank_and_a_constant_router_is_task_arithmetic():
    torch.manual_seed(1)
    base = Tower()
    experts = experts_of(base, 3)
    model = RankOneMoE(Params(rank_k=6)).upscale(copy.deepcopy(base), experts, RunContext(), set())
    block = model.mlp
    assert isinstance(block, RankOneBlock)
    with torch.no_grad():
        block.router.fc.weight.zero_()  # every coefficient = init_lambda
    ta = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in ta.named_parameters():
            p.add_(0.3 * sum(dict(e.named_parameters())[name] - p for e in experts))
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(model(x), ta(x), atol=1e-5, rtol=1e-5)
    # size: base + per task (6+6)·6 for fc1 (8×6, rank 6) and (6+8)·6 for fc2, offsets of both biases, the router
    k = 3 * 6
    assert count_parameters(model) == count_parameters(base) + k * (8 + 6) + k * (6 + 8) + 8 + 6 + (6 * k + k)


@pytest.mark.parametrize("batch_reduce", [False, True])
@pytest.mark.parametrize("select_k", [-1, 3])
def test_parity_with_fusionbench_rankone_moe(batch_reduce, select_k):
    rankone = pytest.importorskip("fusion_bench.models.rankone_moe")
    torch.manual_seed(2)
    base = MLP()
    experts = experts_of(base, 3)
    taus = task_vectors(base, experts)
    factors = {k: rank_one_factors(v, 2) for k, v in taus.items() if k.endswith("weight")}
    offsets = {k: 0.3 * v.sum(0) for k, v in taus.items() if k.endswith("bias")}
    router = Router(6, 6, hidden_layers=1, init_lambda=0.3, generator=torch.Generator())
    mine = RankOneBlock(copy.deepcopy(base), factors, offsets, router, select_k=select_k)
    mine.batch_reduce = batch_reduce
    theirs = rankone.RankOneMoE(6, copy.deepcopy(base), [copy.deepcopy(e) for e in experts], init_lambda=0.3,
                                batch_first=True, router_hidden_layers=1, batch_reduce=batch_reduce,
                                svd_accelerator=None, rank_k=2, select_k=select_k)
    with torch.no_grad():
        router.fc.weight.normal_(0, 1)
    theirs.gate.load_state_dict(router.state_dict())
    x = torch.randn(4, 3, 6)
    torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
    head = nn.Linear(6, 5)
    grads = []
    for module, prefix in ((mine, "router"), (theirs, "gate")):
        module.zero_grad()
        entropy_loss(head(module(x).mean(1))).backward()
        grads.append([getattr(module, prefix).fc.weight.grad.clone(), getattr(module, prefix).fc.bias.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_linear_blocks_route_per_sample():
    torch.manual_seed(3)
    base = nn.Linear(6, 5)
    experts = experts_of(base, 2)
    taus = task_vectors(base, experts)
    block = RankOneBlock(copy.deepcopy(base), {"weight": rank_one_factors(taus["weight"], 3)},
                         {"bias": 0.3 * taus["bias"].sum(0)},
                         Router(6, 6, hidden_layers=2, init_lambda=0.3, generator=torch.Generator(), hidden=12))
    with torch.no_grad():
        block.router.fc2.weight.normal_(0, 1)
    x = torch.randn(5, 6)
    together = block(x)
    torch.testing.assert_close(together, torch.cat([block(x[i:i + 1]) for i in range(5)]), atol=1e-6, rtol=1e-6)
    g = block.router(x[:1])[0]
    weights = block.weights(g)  # the general path: sample 0's own weights
    torch.testing.assert_close(together[0], F.linear(x[0], weights["weight"], weights["bias"]), atol=1e-5, rtol=1e-5)


def test_runs_and_lowers_entropy_on_the_embedded_pool(digits_pools, tmp_path):
    pool, taskpool = digits_pools

    def entropy(model):
        with torch.no_grad():
            return sum(float(entropy_loss(taskpool.logits(model, t, x))) for t in taskpool.tasks
                       for x, _ in taskpool.batches(t, "test", limit=256))

    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path, tasks=tuple(taskpool.tasks))
    start = RankOneMoE(Params(steps=0)).run(pool, ctx)
    out = RankOneMoE(Params(steps=30, lr=1e-3)).run(pool, ctx)
    assert entropy(out.model) < entropy(start.model)
    assert 1.0 < out.extras["params_ratio"] < 10
