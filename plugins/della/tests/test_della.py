"""DELLA: the keep probabilities by hand, their frequencies over seeds (a statistical check of the draws), and
parity with MergeKit 0.1.5's `della` / `della_linear` when MergeKit's Bernoulli draws are replaced by ours."""

from __future__ import annotations

import pytest
import torch
from mergebench_della import Della, DellaLinear, LinearParams, Params

from mergebench_core.engine.generalized_ta import magprune_keep_probability, uniform_draws
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import StateDictSource


def merge(method, base, experts, seed=0):
    out = {}
    merge_sources(method, StateDictSource(base, "base"), [StateDictSource(e, f"e{i}") for i, e in enumerate(experts)],
                  sink=out, seed=seed)
    return out


def test_keep_probabilities_rise_linearly_with_the_magnitude_rank_of_each_row():
    # row 0: |.| ranks 0.1 → 0, 0.5 → 1, 2 → 2, 3 → 3 of 3: spread [0, 1, 2/3, 1/3]; density 0.5, ε 0.1:
    # p = 0.4 + 0.2·spread = [0.4, 0.6, 0.5333, 0.4667]; row 1 is ranked on its own: [-4, 1, 0, 2] → [1, 1/3, 0, 2/3]
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5], [-4.0, 1.0, 0.0, 2.0]])
    probs = magprune_keep_probability(tau, 0.5, 0.1)
    expected = torch.tensor([[0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3], [0.6, 0.4 + 0.2 / 3, 0.4, 0.4 + 0.4 / 3]])
    assert torch.allclose(probs, expected, atol=1e-6)
    # a vector is one row
    assert torch.allclose(magprune_keep_probability(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.2),
                          torch.tensor([0.7, 0.3, 0.5]), atol=1e-6)


def test_entries_are_kept_at_their_probability_over_seeds():
    # 21 entries of rising magnitude, density 0.5, ε 0.4: keep probabilities 0.1, 0.14, ..., 0.9. Over 2,000 seeds
    # each entry's keep frequency is within 5 standard deviations (≤ 0.056) of its probability; the draws of one
    # seed are the same on every call (a hash of seed, tensor, task and entry).
    tau = torch.linspace(0.05, 1.0, 21)
    method = Della(Params(density=0.5, epsilon=0.4))
    probs = magprune_keep_probability(tau, 0.5, 0.4)
    counts = torch.zeros(21)
    for seed in range(2000):
        method.seed = seed
        counts += method.keep_mask("w", 0, tau)
    freq = counts / 2000
    assert (freq - probs).abs().max() < 5 * (0.25 / 2000) ** 0.5
    method.seed = 7
    assert torch.equal(method.keep_mask("w", 0, tau), method.keep_mask("w", 0, tau))
    assert not torch.equal(method.keep_mask("w", 0, tau), method.keep_mask("w", 1, tau))


def test_della_by_hand_with_density_one():
    # density 1 prunes nothing: TIES's election and the mean of the agreeing entries, λ = 2.
    # τ1 = [1, -2, 3], τ2 = [3, 1, -1]: sums [4, -1, 2] → signs [+, -, +]; agreeing means [2, -2, 3]
    base = {"w": torch.zeros(3)}
    experts = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([3.0, 1.0, -1.0])}]
    out = merge(Della(Params(density=1.0, scaling_factor=2.0)), base, experts)
    assert torch.allclose(out["w"], torch.tensor([4.0, -4.0, 6.0]))
    # della_linear, normalize with weights (1, 3): (τ1 + 3 τ2) / 4 = [2.5, 0.25, 0], λ 1
    out = merge(DellaLinear(LinearParams(density=1.0, scaling_factor=1.0, normalize=True, weights=[1.0, 3.0])),
                base, experts)
    assert torch.allclose(out["w"], torch.tensor([2.5, 0.25, 0.0]))


def test_pruned_tensors_keep_their_l1_norm():
    # one expert, density 0.5: the merged update of della_linear (λ 1) is the pruned τ, rescaled to ‖τ‖₁
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(6, 50, generator=g)
    out = merge(DellaLinear(LinearParams(density=0.5, epsilon=0.2, scaling_factor=1.0)), {"w": torch.zeros(6, 50)},
                [{"w": tau}])["w"]
    assert 0.3 < float((out != 0).float().mean()) < 0.7
    assert torch.allclose(out.abs().sum(), tau.abs().sum(), rtol=1e-5)
    assert torch.all((out == 0) | (torch.sign(out) == torch.sign(tau)))


@pytest.mark.parametrize("name,normalize,shape", [("della", True, (7, 33)), ("della", False, (40,)),
                                                  ("della_linear", False, (7, 33)), ("della_linear", True, (5, 3, 4))])
def test_matches_mergekit_with_the_same_draws(monkeypatch, name, normalize, shape):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    weights, density, epsilon, lam, seed = [1.0, 0.5, 2.0], 0.4, 0.15, 0.7, 11
    tasks = iter(range(3))

    def bernoulli(probs):  # MergeKit draws one mask per expert, in order: give it ours
        draws = uniform_draws(seed, "w", next(tasks), probs.numel()).view(probs.shape)
        return (draws < probs.to(torch.float64)).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    theirs = registry.get(name)([TensorGroup.from_tensors([base, *experts], base_index=0)],
                                parameters={"weight": weights, "density": density, "epsilon": epsilon,
                                            "lambda": lam, "normalize": normalize, "rescale": True})[0]
    cls, params = (Della, Params) if name == "della" else (DellaLinear, LinearParams)
    ours = merge(cls(params(density=density, epsilon=epsilon, scaling_factor=lam, normalize=normalize,
                            weights=weights)), {"w": base}, [{"w": e} for e in experts], seed=seed)["w"]
    assert (ours - theirs).abs().max() <= 1e-5


def test_density_and_epsilon_must_keep_probabilities_inside_zero_one():
    with pytest.raises(ValueError, match="lower epsilon"):
        Params(density=0.2, epsilon=0.25)
    Params(density=1.0, epsilon=0.15)  # no pruning: ε does not matter
