"""WEMoE and E-WEMoE: known answers (a zero router is task arithmetic; per-sample routing; the pruning rule), parity
with FusionBench 0.2.33's modules (forward and one entropy step's gradients), and a run on the embedded pool."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from mergebench_wemoe import WEMoE, Params, SparseParams, SparseWEMoE
from torch import nn

from mergebench_core import RunContext
from mergebench_core.upscaling import Router, WeightEnsemblingBlock, count_parameters, entropy_loss, task_vectors
from mergebench_core.upscaling.model import magnitude_prune, quantile


class MLP(nn.Module):
    """A transformer MLP block (fc1, GELU, fc2), as CLIP's."""

    def __init__(self, d: int = 6, h: int = 10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Tower(nn.Module):
    """Two residual layers, each with an `mlp`, and a LayerNorm outside them (task arithmetic there)."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": MLP(d)}) for _ in range(2)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](x)
        return self.norm(x).mean(1)


def experts_of(model: nn.Module, n: int, seed: int = 0) -> list[nn.Module]:
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        e = copy.deepcopy(model)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        out.append(e)
    return out


def task_arithmetic(base: nn.Module, experts: list[nn.Module], lam: float) -> nn.Module:
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(lam * sum(dict(e.named_parameters())[name] - p for e in experts))
    return out


def test_a_zero_router_is_task_arithmetic_at_init_lambda():
    torch.manual_seed(0)
    base = Tower()
    experts = experts_of(base, 3)
    model = WEMoE(Params(init_lambda=0.3)).upscale(copy.deepcopy(base), experts, RunContext(), set())
    for block in (m for m in model.modules() if isinstance(m, WeightEnsemblingBlock)):
        with torch.no_grad():
            block.router.fc2.weight.zero_()  # coefficients = the output bias = init_lambda for every input
    x = torch.randn(4, 5, 6)
    expected = task_arithmetic(base, experts, 0.3)(x)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    # the size: the base, 3 task vectors of both MLPs, and the routers (6·6+6 + 6·3+3 each)
    mlp = sum(p.numel() for p in MLP().parameters())
    assert count_parameters(model) == count_parameters(base) + 2 * (3 * mlp + 6 * 6 + 6 + 6 * 3 + 3)


@pytest.mark.parametrize("linear", [False, True])
def test_routing_is_per_sample(linear):
    torch.manual_seed(1)
    base = nn.Linear(6, 4) if linear else MLP()
    experts = experts_of(base, 3)
    block = WeightEnsemblingBlock(base, task_vectors(base, experts),
                                  Router(6, 3, hidden_layers=2, init_lambda=0.3, generator=torch.Generator()))
    with torch.no_grad():
        block.router.fc2.weight.mul_(100)  # coefficients that differ between samples
    x = torch.randn(5, 7, 6)
    together = block(x)
    alone = torch.cat([block(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)
    # sample 0 by hand: its own mixture θ₀ + Σ g_t τ_t, g = router averaged over its tokens
    g = block.router(x[0]).mean(0)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            p.add_(sum(g[t] * (dict(experts[t].named_parameters())[name] - p) for t in range(3)))
    torch.testing.assert_close(together[0], by_hand(x[0]), atol=1e-5, rtol=1e-5)


def test_pruning_keeps_entries_above_the_quantile():
    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    pruned = magnitude_prune(tau, 0.9)
    threshold = torch.quantile(tau.abs().flatten(), 0.9)
    assert torch.equal(pruned, tau * (tau.abs() > threshold))
    assert int((pruned != 0).sum()) == 120  # 1,200 entries, distinct magnitudes: exactly the top 10 %
    big = torch.rand(20_000_000, generator=torch.Generator().manual_seed(1))  # above torch.quantile's limit
    k = quantile(big, 0.9)
    # strictly above order statistic ⌊0.9·(n−1)⌋ + 1: the last 2,000,000
    assert abs(float(k) - 0.9) < 1e-3 and int((big > k).sum()) == 2_000_000


def test_sparse_variant_shares_one_router_and_prunes_every_tensor():
    torch.manual_seed(2)
    base = Tower()
    experts = experts_of(base, 3)
    model = SparseWEMoE(SparseParams()).upscale(copy.deepcopy(base), experts, RunContext(), set())
    blocks = [m for m in model.modules() if isinstance(m, WeightEnsemblingBlock)]
    assert len(blocks) == 2 and blocks[0].router is blocks[1].router
    for block in blocks:
        for name in block.names:
            tau = block.task_vector(name)
            n = tau[0].numel()  # distinct magnitudes: those above order statistic ⌊0.9·(n−1)⌋ + 1 stay
            assert (tau != 0).flatten(1).sum(1).tolist() == [n - math.floor(0.9 * (n - 1)) - 1] * 3


# ---- parity with FusionBench 0.2.33 -------------------------------------------------------------------------------

def _entropy_step(module, head, x):
    module.zero_grad()
    loss = entropy_loss(head(module(x).mean(1)))
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("batch_reduce", [False, True])
def test_parity_with_fusionbench_weight_ensembling_moe(linear, batch_reduce):
    we_moe = pytest.importorskip("fusion_bench.models.we_moe")
    torch.manual_seed(3)
    base = nn.Linear(6, 6) if linear else MLP()
    experts = experts_of(base, 4)
    mine = WeightEnsemblingBlock(copy.deepcopy(base), task_vectors(base, experts),
                                 Router(6, 4, hidden_layers=2, init_lambda=0.3, generator=torch.Generator()))
    mine.batch_reduce = batch_reduce
    theirs = we_moe.WeightEnsemblingMoE(6, copy.deepcopy(base), [copy.deepcopy(e) for e in experts],
                                        init_lambda=0.3, batch_first=True, router_hidden_layers=2,
                                        batch_reduce=batch_reduce)
    with torch.no_grad():
        mine.router.fc2.weight.normal_(0, 1)  # a router that routes samples differently
    theirs.gate.load_state_dict(mine.router.state_dict())
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
    head = nn.Linear(6, 4)
    g_mine, g_theirs = _entropy_step(mine, head, x), _entropy_step(theirs, head, x)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        torch.testing.assert_close(g_mine[f"router.{name}"], g_theirs[f"gate.{name}"], atol=1e-5, rtol=1e-5)


def test_parity_with_fusionbench_sparse_shared_gate():
    sparse = pytest.importorskip("fusion_bench.models.sparse_we_moe")
    torch.manual_seed(4)
    base = MLP()
    experts = experts_of(base, 3)
    router = Router(6, 3, hidden_layers=2, init_lambda=0.3, generator=torch.Generator().manual_seed(5))
    taus = {k: torch.stack([magnitude_prune(t, 0.9) for t in v]) for k, v in task_vectors(base, experts).items()}
    mine = WeightEnsemblingBlock(copy.deepcopy(base), taus, router)
    gate = sparse.construct_weight_ensembling_gate(6, 3, 0.3, 2)
    gate.load_state_dict(router.state_dict())
    theirs = sparse.SparseWeightEnsemblingMoE_ShardGate(6, copy.deepcopy(base), [copy.deepcopy(e) for e in experts],
                                                        init_lambda=0.3, batch_first=True, router_hidden_layers=2,
                                                        tv_prune_ratio=0.9, sharedgate=gate)
    for name in mine.names:  # the same pruned task vectors
        torch.testing.assert_close(mine.task_vector(name),
                                   torch.stack([dict(tv.named_parameters())[name] for tv in theirs.task_vectors]))
    x = torch.randn(4, 3, 6)
    torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)


# ---- on the embedded pool ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [WEMoE, SparseWEMoE])
def test_test_time_training_lowers_entropy_on_the_embedded_pool(method, digits_pools, tmp_path):
    pool, taskpool = digits_pools
    params = method.Params(steps=30, lr=1e-3)
    out = method(params).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path, tasks=tuple(taskpool.tasks)))
    start = method(method.Params(steps=0)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))

    def entropy(model):
        with torch.no_grad():
            return sum(float(entropy_loss(taskpool.logits(model, t, x))) for t in taskpool.tasks
                       for x, _ in taskpool.batches(t, "test", limit=256))

    assert entropy(out.model) < entropy(start.model)
    assert out.extras["steps"] == 30 and out.extras["params_ratio"] > 8
    assert not any(p.requires_grad for p in out.model.parameters())
