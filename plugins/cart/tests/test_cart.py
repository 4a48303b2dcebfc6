"""CART against an independent numpy formula (float64 SVDs, the authors' rank rule), its limits, and bad input."""

import numpy as np
import pytest
import torch
from mergebench_cart import Cart, Params, kept_rank

from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.engine.data_free import merge_sources
from mergebench_core.engine.sources import StateDictSource
from mergebench_core.errors import ConfigError


def merge(params, base, experts):
    out = {}
    merge_sources(Cart(params), StateDictSource(base, "base"),
                  [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)], sink=out)
    return out


def random_model(seed: int, tasks: int = 4):
    g = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.randn(12, 20, generator=g), "fc.bias": torch.randn(12, generator=g),
            "conv.weight": torch.randn(6, 3, 2, 2, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(tasks)]
    return base, experts


def numpy_cart(base, experts, key, ratio, prior):
    b = base[key].double().numpy()
    taus = np.stack([e[key].double().numpy() - b for e in experts])
    mean = taus.mean(0)
    out = b + mean
    if taus.ndim > 2:
        mats = (taus - mean).reshape(len(taus), taus.shape[1], -1)
        r = max(1, int(ratio * min(mats.shape[1:])))
        for m in mats:
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            out = out + prior * ((u[:, :r] * s[:r]) @ vt[:r]).reshape(b.shape)
    return out


@pytest.mark.parametrize("ratio,prior", [(0.12, 2.0), (0.3, 1.0), (0.5, 0.7)])
def test_matches_a_numpy_formula_of_centred_low_rank_task_arithmetic(ratio, prior):
    base, experts = random_model(0)
    out = merge(Params(rank_ratio=ratio, prior=prior), base, experts)
    for key in base:
        want = numpy_cart(base, experts, key, ratio, prior)
        assert np.allclose(out[key].double().numpy(), want, atol=1e-5), key


def test_limits_ratio_zero_and_one_give_the_weight_average():
    # ratio 0 keeps nothing; ratio 1 keeps every direction, and the centred vectors sum to zero: both are θ_avg
    base, experts = random_model(1)
    average = {k: torch.stack([e[k] for e in experts]).mean(0) for k in base}
    for ratio in (0.0, 1.0):
        out = merge(Params(rank_ratio=ratio, prior=3.0), base, experts)
        for k in base:
            assert torch.allclose(out[k], average[k], atol=1e-5), (ratio, k)


def test_a_hand_computed_rank_one_case():
    # two tasks on a 2×2 weight, base 0: τ1 = diag(3, 1), τ2 = diag(1, 1); τ̄ = diag(2, 1)
    # centred: diag(1, 0) and diag(-1, 0), each rank one already; rank ⌊0.5·2⌋ = 1 keeps them whole
    # θ = τ̄ + 2·(diag(1, 0) + diag(-1, 0)) = diag(2, 1)
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.diag(torch.tensor([3.0, 1.0]))}, {"w": torch.diag(torch.tensor([1.0, 1.0]))}]
    out = merge(Params(rank_ratio=0.5, prior=2.0), base, experts)
    assert torch.allclose(out["w"], torch.diag(torch.tensor([2.0, 1.0])), atol=1e-6)
    # three tasks, τ = diag(4, 1), diag(1, 1.5), diag(1, 3.5): τ̄ = diag(2, 2); centred diag(2, -1),
    # diag(-1, -0.5), diag(-1, 1.5); rank 1 keeps each one's larger entry: diag(2, 0), diag(-1, 0), diag(0, 1.5),
    # summing to diag(1, 1.5); θ = diag(2, 2) + 2·diag(1, 1.5) = diag(4, 5)
    experts = [{"w": torch.diag(torch.tensor(v))} for v in ([4.0, 1.0], [1.0, 1.5], [1.0, 3.5])]
    out = merge(Params(rank_ratio=0.5, prior=2.0), base, experts)
    assert torch.allclose(out["w"], torch.diag(torch.tensor([4.0, 5.0])), atol=1e-5)


def test_rank_rule_is_the_authors():
    assert [kept_rank(0.12, d) for d in (8, 64, 256, 768)] == [1, 7, 30, 92]
    assert kept_rank(0.0, 100) == 0 and kept_rank(1.0, 100) == 100


@pytest.mark.parametrize("item,word", [("cart.rank_ratio=1.5", "rank_ratio"), ("cart.prior=inf", "prior")])
def test_bad_parameters_are_refused_with_their_name(item, word):
    with pytest.raises(ConfigError, match=word):
        build_params("cart", Params, None, parse_overrides([item]))
