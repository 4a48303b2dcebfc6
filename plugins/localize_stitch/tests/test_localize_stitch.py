"""Localize-and-Stitch: hand-computed stitching of top-k masks, one mask-learning step against an independent
computation with plain autograd, and runs on the embedded pool."""

from __future__ import annotations

import copy

import pytest
import torch
from mergebench_localize_stitch import (
    DatalessLocalizeStitch,
    DatalessParams,
    LocalizeStitch,
    Params,
    learn_mask,
    stitch,
    top_fraction_masks,
)
from torch import nn


def test_hand_computed_dataless_stitch():
    # |τ_1| = [4, 1, 0, 2] keeps entries 0 and 3; |τ_2| = [2, 3, 1, 2] keeps 1 and then 0 (a tie with 3, the earlier
    # entry wins). Entry 0 is in both masks: (4 + 2) / 2 = 3; entry 1: 3; entry 2: no mask, 0; entry 3: 2.
    taus = {"w": torch.tensor([[4.0, 1.0, 0.0, 2.0], [2.0, 3.0, 1.0, -2.0]])}
    masks = top_fraction_masks(taus, ["w"], 0.5)
    assert [m.tolist() for m in masks] == [[True, False, False, True], [True, True, False, False]]
    torch.testing.assert_close(stitch(taus["w"], torch.stack(masks)), torch.tensor([3.0, 3.0, 0.0, 2.0]))


def test_full_masks_are_the_average_of_the_task_vectors():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(3, 10, generator=gen)
    torch.testing.assert_close(stitch(flat, torch.ones(3, 10, dtype=torch.bool)), flat.mean(0))


class _TaskPool:
    """Logits are the model's outputs (a toy task pool for LogitsOf)."""

    name = "toy"

    def logits(self, model, task, inputs):
        return model(inputs)


def test_one_learning_step_matches_plain_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    keys = [k for k, _ in model.named_parameters()]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tau = {k: 0.5 * torch.randn_like(v) for k, v in base.items()}
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    p = Params(sparsity=0.3, sigmoid_bias=0.2, lr=50.0, l1_strength=0.1, epochs=1)
    from mergebench_core.data.statistics import LogitsOf

    got = learn_mask(LogitsOf(model, _TaskPool(), "t"), base, tau, keys, batches, p)

    # independently: logits S start at ±0.2 on the top 30 % of |τ| (by sorting), one step of the stated rule
    flat_tau = torch.cat([tau[k].flatten() for k in keys])
    k = int(0.3 * flat_tau.numel())
    s = torch.full_like(flat_tau, -0.2)
    s[flat_tau.abs().argsort(descending=True, stable=True)[:k]] = 0.2
    m = copy.deepcopy(model)
    offset = 0
    with torch.no_grad():
        for name, param in m.named_parameters():
            n = param.numel()
            param.copy_(base[name] + torch.sigmoid(s[offset:offset + n]).view_as(param) * tau[name])
            offset += n
    g = torch.zeros_like(flat_tau)
    for xb, yb in batches:
        m.zero_grad()
        nn.functional.cross_entropy(m(xb), yb).backward()
        g += 50.0 * torch.cat([q.grad.flatten() for q in m.parameters()]) * flat_tau / 2
    d = torch.sigmoid(s) * (1 - torch.sigmoid(s))
    s = s - g * d + 0.1 * torch.where(s > 0, d, -d)
    assert torch.equal(got, torch.round(torch.sigmoid(s)).bool())
    start = torch.zeros_like(got)
    start[flat_tau.abs().argsort(descending=True, stable=True)[:k]] = True
    assert not torch.equal(got, start)  # the step changed the mask (a missing step would not pass)


def test_without_learning_the_mask_is_the_initial_top_fraction():
    torch.manual_seed(1)
    model = nn.Linear(5, 2)
    keys = ["weight", "bias"]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tau = {k: torch.randn_like(v) for k, v in base.items()}
    from mergebench_core.data.statistics import LogitsOf

    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 0, 1]))]
    got = learn_mask(LogitsOf(model, _TaskPool(), "t"), base, tau, keys, batches,
                     Params(sparsity=0.25, lr=0.0, epochs=3))
    want = top_fraction_masks({k: v[None] for k, v in tau.items()}, keys, 0.25)[0]
    assert torch.equal(got, want)


def test_params_are_validated():
    with pytest.raises(ValueError, match="sparsity"):
        DatalessParams(sparsity=2.0)
    with pytest.raises(ValueError):
        Params(epochs=-1)


@pytest.mark.parametrize("method", [DatalessLocalizeStitch(), LocalizeStitch(Params(n_shot=8, epochs=2))])
def test_runs_on_the_digits_pool(method, digits_pools):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = method.run(pool, RunContext(taskpool=taskpool))
    assert set(out.extras["mask_proportion"]) == set(pool.expert_names)
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.5
