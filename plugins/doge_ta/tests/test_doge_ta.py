"""DOGE TA: the closed forms of its pieces, parity with FusionBench 0.2.33's DOGE_TA_Algorithm, a digits run."""

from __future__ import annotations

import copy

import pytest
import torch
from mergebench_doge_ta import DogeTA, Params, doge_update, interference_loss, shared_projection
from torch import nn


def test_projection_spans_the_tasks_top_directions():
    # τ_1 = 3·e1 f1ᵀ + e2 f2ᵀ, τ_2 = 2·e3 f3ᵀ on 4×4: r = 4, two directions per task: {e1, e2} and {e3, e4-ish};
    # with subspace 2 the projection keeps ⌊4/2⌋ = 2 directions of [U_1[:, :2] U_2[:, :2]], all of singular value 1:
    # any two of them; with subspace 1 all four, so P = I.
    t1 = torch.zeros(4, 4)
    t1[0, 0], t1[1, 1] = 3.0, 1.0
    t2 = torch.zeros(4, 4)
    t2[2, 2], t2[3, 3] = 2.0, 0.5
    p = shared_projection(torch.stack([t1, t2]), 1)
    torch.testing.assert_close(p, torch.eye(4), atol=1e-5, rtol=0)
    p2 = shared_projection(torch.stack([t1, t2]), 2)
    torch.testing.assert_close(p2 @ p2, p2, atol=1e-5, rtol=0)  # a projection of rank 2
    assert abs(float(torch.trace(p2)) - 2.0) < 1e-5


def test_loss_by_hand():
    # one row, two tasks: τ_1 = [1, 0], τ_2 = [0, 2], λ = (1, 0.5), δ = [1, 1]: merged = [1, 1] + 1.5·[1, 1] =
    # [2.5, 2.5]; ⟨τ_1, τ_1 − merged⟩ = 1·(1 − 2.5) = −1.5; ⟨τ_2, τ_2 − merged⟩ = 2·(2 − 2.5) = −1; loss 3.25
    taus = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    got = interference_loss(taus, torch.ones(1, 2), torch.tensor([1.0, 0.5]))
    assert abs(float(got) - 3.25) < 1e-6


def test_without_steps_and_masks_it_is_norm_scaled_task_arithmetic():
    gen = torch.Generator().manual_seed(0)
    taus = {"w": torch.randn(3, 5, 4, generator=gen)}
    got = doge_update(taus, ["w"], Params(K=100, steps=0, lamda=0.2))["w"]
    want = sum(0.2 / t.norm() * t for t in taus["w"])
    torch.testing.assert_close(got, want)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))
        self.layer_norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.layer_norm(self.encoder(x))


def test_parity_with_fusion_bench(monkeypatch):
    doge = pytest.importorskip("fusion_bench.method.doge_ta.doge_ta")
    from fusion_bench import BaseModelPool

    from mergebench_core import PRETRAINED, RunContext

    torch.manual_seed(0)
    base = Toy()
    experts = {}
    for i in range(3):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))
        experts[f"t{i}"] = m
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)  # FusionBench logs GPU memory
    algo = doge.DOGE_TA_Algorithm(subspace=2, K=30, lamda=0.07)
    theirs = algo.run(BaseModelPool({"_pretrained_": copy.deepcopy(base), **copy.deepcopy(experts)})).state_dict()

    class Pool:
        name, has_pretrained, relation = "toy", True, "finetuned"
        expert_names = tuple(experts)

        def load_model(self, name):
            return copy.deepcopy(base if name == PRETRAINED else experts[name])

        def state_dict(self, name):
            return {k: v.detach().clone() for k, v in self.load_model(name).state_dict().items()}

    ours = DogeTA(Params(subspace=2)).run(Pool(), RunContext()).model.state_dict()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k].detach(), atol=1e-5, rtol=1e-5)


def test_params_are_validated():
    with pytest.raises(ValueError, match="K"):
        Params(K=150)


def test_runs_on_the_digits_pool(digits_pools):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = DogeTA(Params(steps=20)).run(pool, RunContext(taskpool=taskpool))
    assert out.extras["merged_tensors"] > 0
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.5


def test_a_task_that_left_a_tensor_unchanged_adds_nothing():
    gen = torch.Generator().manual_seed(1)
    taus = {"w": torch.stack([torch.randn(4, 4, generator=gen), torch.zeros(4, 4)])}
    got = doge_update(taus, ["w"], Params(K=100, steps=0, lamda=0.5))["w"]
    torch.testing.assert_close(got, 0.5 / taus["w"][0].norm() * taus["w"][0])
