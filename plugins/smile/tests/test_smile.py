"""SMILE: known answers (an input in one expert's subspace gets that expert exactly; top_k = all gives the softmax-
weighted sum of the full task vectors), parity with FusionBench 0.2.33's `SmileMoELinear`, a run on the embedded pool,
and the refusal of `mergebench merge`."""

from __future__ import annotations

import copy

import pytest
import torch
from mergebench_smile import Params, Smile, smile_layer
from torch import nn

from mergebench_core import RunContext
from mergebench_core.contract.api import file_refusal
from mergebench_core.upscaling import SmileLinear, count_parameters


def disjoint_experts(out=5, inputs=9, tasks=3, seed=0):
    """Experts whose task vectors read disjoint blocks of 3 input columns each."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(inputs, out)
    experts = []
    for t in range(tasks):
        e = copy.deepcopy(base)
        with torch.no_grad():
            e.weight[:, 3 * t:3 * t + 3] += torch.randn(out, 3, generator=gen)
            e.bias += torch.randn(out, generator=gen)
        experts.append(e)
    return base, experts


def test_an_input_in_one_experts_subspace_gets_that_expert_exactly():
    base, experts = disjoint_experts()
    layer = smile_layer(base, experts, gate_k=3, k=128, top_k=1)
    x = torch.zeros(4, 9)
    x[:, 3:6] = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))  # only task 1's columns
    with torch.no_grad():
        torch.testing.assert_close(layer(x), experts[1](x), atol=1e-5, rtol=1e-5)


def test_top_k_all_with_full_rank_is_the_softmax_weighted_sum_of_task_vectors():
    base, experts = disjoint_experts(seed=2)
    layer = smile_layer(base, experts, gate_k=1, k=9, top_k=3)
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        taus = [e.weight - base.weight for e in experts]
        scores = torch.stack([(x @ torch.linalg.svd(t).Vh[0]).abs() for t in taus], dim=1)  # ‖V_t[:, :1]ᵀx‖
        w = torch.softmax(scores, dim=1)
        expected = base(x) + sum(w[:, t:t + 1] * (x @ taus[t].T + experts[t].bias - base.bias) for t in range(3))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k,gate_k,k", [(1, 1, 3), (2, 2, 4)])
def test_parity_with_fusionbench_smile_moe_linear(top_k, gate_k, k):
    smile = pytest.importorskip("fusion_bench.models.smile_moe.linear_from_module")
    torch.manual_seed(4)
    base = nn.Linear(7, 6)
    experts = [copy.deepcopy(base) for _ in range(3)]
    for e in experts:
        with torch.no_grad():
            e.weight.add_(torch.randn_like(e.weight))
            e.bias.add_(torch.randn_like(e.bias))
    mine = smile_layer(copy.deepcopy(base), [copy.deepcopy(e) for e in experts], gate_k, k, top_k)
    theirs = smile.SmileMoELinear(copy.deepcopy(base), [copy.deepcopy(e) for e in experts], gate_k=gate_k, k=k,
                                  top_k=top_k)
    x = torch.randn(4, 5, 7)  # tokens are routed one by one
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(4, 6), nn.Linear(6, 3), nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


def test_every_linear_layer_is_upscaled_and_the_rest_stays_pretrained():
    torch.manual_seed(5)
    base = Net()
    experts = [copy.deepcopy(base) for _ in range(2)]
    for e in experts:
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p))
    model = Smile(Params(k=2)).upscale(copy.deepcopy(base), experts, RunContext(), set())
    assert isinstance(model.fc1, SmileLinear) and isinstance(model.fc2, SmileLinear)
    torch.testing.assert_close(model.norm.weight, base.norm.weight)
    # per layer and task: U (out×k) + SVᵀ (k×in) + Δb (out); the router: T·gate_k·in
    extra = 2 * (6 * 2 + 2 * 4 + 6) + 2 * 4 + 2 * (3 * 2 + 2 * 6 + 3) + 2 * 6
    assert count_parameters(model) == count_parameters(base) + extra


def test_runs_on_the_embedded_pool_and_merge_refuses_it(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = Smile().run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    assert out.extras["params_ratio"] > 1
    x, _ = next(iter(taskpool.batches("digits", "test", batch_size=8)))
    with torch.no_grad():
        together = out.model(x)
        alone = torch.cat([out.model(x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone)  # routing per sample: a batch changes nothing
    files = type("Files", (), {"files_only": True, "name": "files"})()
    reason = file_refusal(Smile, files)
    assert reason is not None and "upscaled model" in reason and "checkpoint" in reason
