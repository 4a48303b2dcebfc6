"""dare_linear: by hand, the L1 rescaling, the same drops as dare_ta, and parity with MergeKit 0.1.5's
`dare_linear` when MergeKit's Bernoulli draws are replaced by ours."""

from __future__ import annotations

import pytest
import torch
from mergebench_dare import DareLinear, DareTaskArithmetic, LinearParams, TaParams

from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.pipeline import drop_keep
from mergebench_core.engine.tensors import StateDictSource


def merge(method, base, experts, seed=0):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out, seed=seed)
    return out


def test_density_one_is_weighted_task_arithmetic():
    # τ1 = [1, -2], τ2 = [3, 4], weights (1, 0.5), λ 2: 2·(τ1 + 0.5 τ2) = [5, 0]; normalised by 1.5: [10/3, 0]
    base = {"w": torch.tensor([1.0, 1.0])}
    experts = [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([4.0, 5.0])}]
    out = merge(DareLinear(LinearParams(density=1.0, scaling_factor=2.0, weights=[1.0, 0.5])), base, experts)
    assert torch.allclose(out["w"], torch.tensor([6.0, 1.0]))
    out = merge(DareLinear(LinearParams(density=1.0, scaling_factor=2.0, weights=[1.0, 0.5], normalize=True)), base,
                experts)
    assert torch.allclose(out["w"], base["w"] + torch.tensor([10 / 3, 0.0]))


def test_drops_like_dare_ta_and_rescales_to_the_l1_norm():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(30, 20)}
    tau = torch.randn(30, 20, generator=g)
    linear = merge(DareLinear(LinearParams(density=0.3, scaling_factor=1.0)), base, [{"w": tau}], seed=5)["w"]
    ta = merge(DareTaskArithmetic(TaParams(p=0.7, rescale=False, scaling_factor=1.0)), base, [{"w": tau}],
               seed=5)["w"]
    assert torch.equal(linear != 0, ta != 0)  # the same entries survive
    assert torch.allclose(linear, ta * tau.abs().sum() / ta.abs().sum())
    assert torch.allclose(linear.abs().sum(), tau.abs().sum(), rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_mergekit_with_the_same_draws(monkeypatch, normalize):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 17, generator=g)
    experts = [base + 0.1 * torch.randn(9, 17, generator=g) for _ in range(3)]
    weights, density, lam, seed = [0.3, 1.0, 0.6], 0.6, 0.9, 4
    tasks = iter(range(3))

    def bernoulli(probs):  # MergeKit's one mask per expert, in order: ours
        return drop_keep(seed, "w", next(tasks), range(probs.numel()), 1.0 - density).view(probs.shape)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    theirs = registry.get("dare_linear")([TensorGroup.from_tensors([base, *experts], base_index=0)],
                                         parameters={"weight": weights, "density": density, "lambda": lam,
                                                     "normalize": normalize, "rescale": True})[0]
    ours = merge(DareLinear(LinearParams(density=density, scaling_factor=lam, normalize=normalize, weights=weights)),
                 {"w": base}, [{"w": e} for e in experts], seed=seed)["w"]
    assert (ours - theirs).abs().max() <= 1e-5
