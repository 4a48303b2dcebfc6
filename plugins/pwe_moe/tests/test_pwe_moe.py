"""PWE-MoE: known answers (a zero router is task arithmetic at every preference; an identity router is
preference-weighted task arithmetic), the Dirichlet(1) draw, parity with FusionBench 0.2.33's
`ParetoWeightEnsemblingModule` at a fixed preference, and one training reused for every preference."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mergebench_pwe_moe import Params, PWEMoE, uniform_simplex
from torch import nn

from mergebench_core import RunContext
from mergebench_core.upscaling import PreferenceBlock, Router, set_preference, task_vectors


class MLP(nn.Module):
    def __init__(self, d: int = 5, h: int = 7):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp, self.norm = MLP(), nn.LayerNorm(5)

    def forward(self, x):
        return self.norm(x + self.mlp(x))


def experts_of(model, n, seed=0):
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        e = copy.deepcopy(model)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        out.append(e)
    return out


def weighted_sum(base, experts, coeffs):
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(sum(c * (dict(e.named_parameters())[name] - p) for c, e in zip(coeffs, experts)))
    return out


def test_a_zero_router_is_task_arithmetic_at_every_preference():
    torch.manual_seed(0)
    base = Net()
    experts = experts_of(base, 3)
    model = PWEMoE(Params()).upscale(copy.deepcopy(base), experts, RunContext(), set())
    assert isinstance(model.mlp, PreferenceBlock)
    with torch.no_grad():
        model.mlp.router.fc2.weight.zero_()
    x = torch.randn(4, 5)
    expected = weighted_sum(base, experts, [0.3] * 3)(x)
    for r in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5]):
        set_preference(model, torch.tensor(r))
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_an_identity_router_is_preference_weighted_task_arithmetic():
    torch.manual_seed(1)
    base = MLP()
    experts = experts_of(base, 3)
    router = Router(3, 3, hidden_layers=1, init_lambda=0.0, generator=torch.Generator())
    with torch.no_grad():
        router.fc.weight.copy_(torch.eye(3))
        router.fc.bias.zero_()
    block = PreferenceBlock(copy.deepcopy(base), task_vectors(base, experts), router)
    r = torch.tensor([0.6, 0.1, 0.3])
    block.set_preference(r)
    x = torch.randn(4, 5)
    torch.testing.assert_close(block(x), weighted_sum(base, experts, r.tolist())(x), atol=1e-6, rtol=1e-6)


def test_preferences_are_drawn_uniformly_from_the_simplex_and_seeded():
    draws = torch.stack([uniform_simplex(4, torch.Generator().manual_seed(0), torch.device("cpu")) for _ in range(2)])
    assert torch.equal(draws[0], draws[1])
    gen = torch.Generator().manual_seed(1)
    many = torch.stack([uniform_simplex(4, gen, torch.device("cpu")) for _ in range(4000)])
    torch.testing.assert_close(many.sum(1), torch.ones(4000))
    assert bool((many > 0).all())
    # Dirichlet(1,1,1,1): each coordinate has mean 1/4 and variance (1·3)/(4²·5) = 0.0375
    torch.testing.assert_close(many.mean(0), torch.full((4,), 0.25), atol=0.01, rtol=0)
    torch.testing.assert_close(many.var(0), torch.full((4,), 0.0375), atol=0.004, rtol=0)


def fusionbench_pwe_module():
    """FusionBench's `method/pwe_moe/module.py`, loaded by itself: it needs only torch, while importing its package
    pulls in every method's dependencies (bidict, lightning, ...)."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fusion-bench is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "method" / "pwe_moe" / "module.py"
    if not path.is_file():
        pytest.skip(f"fusion-bench has no {path}")
    loaded = importlib.util.spec_from_file_location("fusionbench_pwe_moe_module", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_parity_with_fusionbench_pareto_weight_ensembling_module():
    module = fusionbench_pwe_module()
    torch.manual_seed(2)
    base = MLP()
    experts = experts_of(base, 3)
    router = Router(3, 3, hidden_layers=2, init_lambda=0.3, generator=torch.Generator().manual_seed(3), hidden=6)
    with torch.no_grad():
        router.fc2.weight.normal_(0, 1)
    mine = PreferenceBlock(copy.deepcopy(base), task_vectors(base, experts), router)
    theirs = module.ParetoWeightEnsemblingModule(copy.deepcopy(base), [copy.deepcopy(e) for e in experts],
                                                 init_lambda=0.3, router_hidden_layers=2)
    theirs.gate.load_state_dict({"0.weight": router.fc1.weight, "0.bias": router.fc1.bias,
                                 "2.weight": router.fc2.weight, "2.bias": router.fc2.bias})
    r = torch.tensor([0.5, 0.2, 0.3])
    mine.set_preference(r)
    theirs._set_preference_vector(r)
    x = torch.randn(6, 5)
    torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_one_training_serves_every_preference(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    tasks = tuple(taskpool.tasks)
    params = Params(steps=20, lr=1e-3)
    first = PWEMoE(params).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path, tasks=tasks))
    vertex = (1.0,) + (0.0,) * (len(tasks) - 1)
    second = PWEMoE(params).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path, tasks=tasks,
                                                 preference=vertex))
    assert first.extras["routers"] == "trained" and second.extras["routers"] == "cached"
    assert second.extras["preference"] == list(vertex)
    routers = [(a, b) for (n, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters())
               if "router" in n]
    assert routers and all(torch.equal(a, b) for a, b in routers)
    x, _ = next(iter(taskpool.batches("digits", "test", batch_size=16)))
    with torch.no_grad():
        set_preference(second.model, torch.full((len(tasks),), 1.0 / len(tasks)))
        torch.testing.assert_close(second.model(x), first.model(x))  # the same model at the same preference
    assert first.extras["params_ratio"] > 1
