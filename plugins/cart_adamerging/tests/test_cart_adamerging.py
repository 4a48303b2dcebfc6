"""CART + AdaMerging: coefficients fixed at CART's λ reproduce `cart`, the per-task truncation by hand, and entropy
training on the embedded pool."""

from __future__ import annotations

import pytest
import torch
from mergebench_cart import Cart
from mergebench_cart import Params as CartParams
from mergebench_cart_adamerging import CartAdaMerging, Params

from mergebench_core import RunContext
from mergebench_core.engine.low_rank import truncate_each
from mergebench_core.upscaling import entropy_loss


def test_truncation_by_hand():
    # diag(3, 2, 1) at rank 2 keeps the two largest singular values; a rank-one matrix stays itself
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    u = torch.tensor([[1.0], [2.0], [0.0]]) @ torch.tensor([[0.0, 1.0, 1.0]])
    out = truncate_each(torch.stack([a, u]), 2)
    assert torch.allclose(out[0], torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    assert torch.allclose(out[1], u, atol=1e-6)
    assert not truncate_each(torch.stack([a]), 0).any()


@pytest.mark.parametrize("ratio,prior", [(0.12, 2.0), (0.5, 0.7)])
def test_coefficients_fixed_at_cart_lambda_reproduce_cart(digits_pools, tmp_path, ratio, prior):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path)
    ours = CartAdaMerging(Params(steps=0, rank_ratio=ratio, prior=prior)).run(pool, ctx)
    cart = Cart(CartParams(rank_ratio=ratio, prior=prior)).run(pool, ctx)
    theirs = cart.model.state_dict()
    for key, value in ours.model.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=2e-6), key
    coeffs = ours.extras["coefficients"]
    assert set(coeffs) == set(pool.expert_names)
    assert all(v == pytest.approx(prior) for row in coeffs.values() for v in row.values())
    assert ours.extras["matrices"] == 3  # the digits encoder's fc1, fc2, fc3


def _entropy(model, taskpool):
    with torch.no_grad():
        return sum(float(entropy_loss(taskpool.logits(model, t, x))) for t in taskpool.tasks
                   for x, _ in taskpool.batches(t, "test", limit=256))


def test_training_lowers_the_entropy_and_is_seeded(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    ctx = RunContext(taskpool=taskpool, cache_dir=tmp_path, seed=3)
    start = CartAdaMerging(Params(steps=0)).run(pool, ctx)
    a = CartAdaMerging(Params(steps=30, lr=1e-2)).run(pool, ctx)
    b = CartAdaMerging(Params(steps=30, lr=1e-2)).run(pool, ctx)
    assert _entropy(a.model, taskpool) < _entropy(start.model, taskpool)
    assert a.extras["coefficients"] == b.extras["coefficients"]


def test_bad_parameters_say_which():
    with pytest.raises(ValueError, match="rank_ratio"):
        Params(rank_ratio=1.5)
    with pytest.raises(ValueError, match="prior"):
        Params(prior=float("nan"))
