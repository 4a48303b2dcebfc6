"""The whole-tensor generalized task arithmetic of `engine.generalized_ta` by hand: the draws shared with DARE, the
L1 rescale and its guard, and the weighted sign consensus."""

from __future__ import annotations

import pytest
import torch

from mergebench_core.engine.generalized_ta import consensus_merge, l1_rescale
from mergebench_core.engine.task_vector_stages import drop_keep, uniform_draws


def test_uniform_draws_are_the_draws_dare_thresholds():
    for p in (0.1, 0.5, 0.93):
        draws = uniform_draws(3, "layer.weight", 2, 5000)
        keep = drop_keep(3, "layer.weight", 2, range(5000), p)
        assert torch.equal(keep.bool(), draws >= round(p * (1 << 31)) / (1 << 31))
        assert 0.0 <= float(draws.min()) and float(draws.max()) < 1.0
    assert abs(float(uniform_draws(0, "w", 0, 100_000).mean()) - 0.5) < 0.01


def test_l1_rescale_restores_the_norm_unless_a_norm_vanishes():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = tau * torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert torch.allclose(l1_rescale(tau, kept), kept * 10 / 6)
    assert torch.equal(l1_rescale(tau, torch.zeros(4)), torch.zeros(4))


def test_weighted_consensus_by_hand():
    # weighted deltas: w = (1, 2); τ1 = [1, -1, 2], τ2 = [1, 2, -3] → w·τ = [1, -1, 2], [2, 4, -6]
    # sums [3, 3, -4] → signs [+, +, -]; agreeing: [1 and 2 | 4 | -6]: sum [3, 4, -6];
    # weights that count: [1 + 2 | 2 | 2] → mean [1, 2, -3]
    w = torch.tensor([1.0, 2.0])
    deltas = torch.tensor([[1.0, -1.0, 2.0], [1.0, 2.0, -3.0]]) * w.view(-1, 1)
    assert torch.allclose(consensus_merge(deltas, w, elect=True, normalize=False), torch.tensor([3.0, 4.0, -6.0]))
    assert torch.allclose(consensus_merge(deltas, w, elect=True, normalize=True), torch.tensor([1.0, 2.0, -3.0]))
    # no election: Σ w τ = [3, 3, -4], normalised by Σ w = 3
    assert torch.allclose(consensus_merge(deltas, w, elect=False, normalize=True), torch.tensor([1.0, 1.0, -4 / 3]))


@pytest.mark.parametrize("shape", [(37, 11), (9, 4, 5), (50,)])
def test_magprune_mask_made_a_block_at_a_time_has_the_bits_of_the_whole(shape):
    from mergebench_core.engine.generalized_ta import magprune_keep_mask, magprune_keep_probability

    tau = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    tau[0] = 0.0  # ties in magnitude take ranks in index order in every block
    whole = uniform_draws(5, "w", 1, tau.numel()).view(tau.shape) < magprune_keep_probability(tau, 0.3, 0.1).double()
    for block in (1, 7, 64, 10_000):
        mask = magprune_keep_mask(tau, 0.3, 0.1, 5, "w", 1, block=block)
        assert mask.dtype == tau.dtype and torch.equal(mask.bool(), whole), block
    assert torch.equal(uniform_draws(5, "w", 1, 10, start=20), uniform_draws(5, "w", 1, 30)[20:])
