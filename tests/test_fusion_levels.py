"""Level-by-level fusion pieces (mergebench_core.fusion.levels) against known answers: least squares recovers a planted
level, K-means and Hungarian targets of identical neuron sets are those neurons, mismatched models are refused, and
the loss barrier of a curve."""

from __future__ import annotations

import pytest
import torch
from mergebench_digits_archs import CNNClassifier, MLPClassifier
from mergebench_digits_seeds import DigitsFullTaskPool
from torch import nn

from mergebench_core import MergebenchError
from mergebench_core.fusion.levels import (
    Targets,
    capture_level,
    design_matrix,
    fit_linear_level,
    hungarian_targets,
    interpolation_curve,
    kmeans_targets,
    least_squares,
    loss_barrier,
    match_to_inputs,
    neuron_importance,
    pair_costs,
)
from mergebench_core.pools.states import StateDictPool, load_states

G = torch.Generator().manual_seed(0)


def test_least_squares_recovers_a_planted_linear_level_exactly():
    planted = nn.Linear(12, 5)
    x = torch.randn(40, 12, generator=G)
    with torch.no_grad():
        y = planted(x)
    level = nn.Linear(12, 5)
    residual = fit_linear_level(level, x, y, level="fc")
    assert residual < 1e-6
    torch.testing.assert_close(level.weight, planted.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(level.bias, planted.bias, atol=1e-5, rtol=1e-5)


def test_least_squares_recovers_a_planted_convolution_exactly():
    planted = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(6, 3, 8, 8, generator=G)
    with torch.no_grad():
        y = planted(x).permute(0, 2, 3, 1).reshape(-1, 4)  # features last, rows (sample, h, w)
    level = nn.Conv2d(3, 4, 3, padding=1)
    assert design_matrix(level, x).shape == (6 * 64, 3 * 9 + 1)
    fit_linear_level(level, x, y, level="conv")
    torch.testing.assert_close(level.weight, planted.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(level.bias, planted.bias, atol=1e-5, rtol=1e-5)


def test_fewer_samples_than_unknowns_is_refused_with_the_number_needed():
    level = nn.Linear(128, 10)
    with pytest.raises(MergebenchError, match="100 rows of inputs for 129 unknowns.*raise num_fusion_samples from 100 "
                                              "to at least 129"):
        fit_linear_level(level, torch.randn(100, 128), torch.randn(100, 10), level="fc2", n_examples=100)
    with pytest.raises(MergebenchError, match="nn.Linear or nn.Conv2d"):
        design_matrix(nn.LayerNorm(4), torch.randn(3, 4))
    x = torch.cat([torch.randn(30, 3, generator=G), torch.zeros(30, 2)], 1)  # two dead inputs: minimum norm, no error
    w = least_squares(x, x[:, :1])
    assert w[3:].abs().max() == 0


def test_kmeans_of_identical_neuron_sets_returns_those_neurons_in_the_reference_order():
    a = torch.randn(50, 8, generator=G)
    shuffled = a[:, torch.randperm(8, generator=G)]
    ones = torch.ones(8)
    t = kmeans_targets([a, shuffled, a], [ones, ones, ones], 8, restarts=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t.values, a.double())
    assert torch.equal(t.assignment[0], torch.arange(8)) and t.cost == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(shuffled[:, torch.argsort(t.assignment[1])], a)  # each shuffled neuron went to its original
    out = kmeans_targets([a, a], [ones, ones], 8, identity=True)
    assert torch.equal(out.assignment[1], torch.arange(8))


def test_kmeans_finds_planted_clusters_and_weighs_by_importance():
    centres = torch.randn(20, 3, generator=G) * 10
    a = centres + 0.01 * torch.randn(20, 3, generator=G)
    b = centres[:, [2, 0, 1]] + 0.01 * torch.randn(20, 3, generator=G)
    t = kmeans_targets([a, b], [torch.ones(3), torch.tensor([3.0, 3.0, 3.0])], 3)
    assert torch.equal(t.assignment[1], torch.tensor([2, 0, 1]))
    torch.testing.assert_close(t.values[:, 0], (a[:, 0].double() + 3 * b[:, 1].double()) / 4)
    with pytest.raises(MergebenchError, match="needs at least 7 neurons"):
        kmeans_targets([a], [torch.ones(3)], 7)


def test_hungarian_targets_pair_each_neuron_with_its_twin():
    a = torch.randn(30, 6, generator=G)
    perm = torch.randperm(6, generator=G)
    costs = pair_costs(a, a[:, perm], torch.ones(6), torch.ones(6))
    assert costs[torch.arange(6), torch.argsort(perm)].abs().max() < 1e-6  # twin pairs cost nothing
    assert costs.min(1).values.abs().max() < 1e-6 and (costs > 1e-6).sum() == 30
    t = hungarian_targets([a, a[:, perm]], [torch.ones(6), torch.ones(6)])
    torch.testing.assert_close(t.values, a.double())
    assert torch.equal(t.assignment[1], perm)  # shuffled neuron j is a's neuron perm[j]
    mean = hungarian_targets([a, 2 * a], [torch.ones(6), 3 * torch.ones(6)], identity=True)
    torch.testing.assert_close(mean.values, (a.double() + 3 * 2 * a.double()) / 4)


def test_residual_targets_follow_the_input_order():
    x = torch.randn(40, 5, generator=G).double()
    perm = torch.tensor([3, 0, 4, 1, 2])
    t = match_to_inputs(Targets(x[:, perm] + 0.01, [perm.clone()]), x)
    torch.testing.assert_close(t.values, x + 0.01)


def test_importance_has_mean_one():
    acts = torch.tensor([[1.0, -3.0, 0.0], [1.0, 1.0, 0.0]])
    assert neuron_importance(acts).tolist() == [1.0, 1.0, 1.0]
    s = neuron_importance(acts, "activation")
    assert s.mean() == pytest.approx(1.0) and s[1] == pytest.approx(2 * s[0]) and s[2] > 0
    with pytest.raises(MergebenchError, match="unknown neuron importance"):
        neuron_importance(acts, "conductance")


def test_level_inputs_are_captured_in_their_own_shape():
    model = CNNClassifier().eval()
    inputs, outputs = capture_level(model, "conv2", DigitsFullTaskPool(), ["digits"], n_examples=7, batch_size=3)
    assert inputs.shape == (7, 16, 4, 4) and outputs.shape == (7, 32, 4, 4)
    with pytest.raises(MergebenchError, match="not a submodule"):
        capture_level(model, "conv9", DigitsFullTaskPool(), ["digits"], n_examples=2)


def test_models_of_different_architectures_are_refused_by_name():
    small, wide = MLPClassifier(hidden=16).state_dict(), MLPClassifier(hidden=32).state_dict()
    pool = StateDictPool(MLPClassifier, {"a": small, "b": wide}, name="mixed")
    with pytest.raises(MergebenchError, match="'a' and 'b' of pool 'mixed' are not one architecture: tensor "
                                              "'fc1.weight' has shape \\(16, 64\\) in 'a' and \\(32, 64\\) in 'b'"):
        load_states(pool)
    renamed = {("head" + k[3:] if k.startswith("fc3") else k): v for k, v in small.items()}
    with pytest.raises(MergebenchError, match="'b' lacks \\['fc3.bias', 'fc3.weight'\\]"):
        load_states(StateDictPool(MLPClassifier, {"a": small, "b": renamed}))


def test_loss_barrier_of_a_curve_and_of_a_model_with_itself():
    curve = [{"t": 0.0, "loss": 1.0}, {"t": 0.5, "loss": 3.0}, {"t": 1.0, "loss": 2.0}]
    assert loss_barrier(curve) == pytest.approx(1.5)
    assert loss_barrier([{"t": t / 2, "accuracy": a} for t, a in enumerate([0.9, 0.5, 0.8])], "accuracy") == \
        pytest.approx(0.35)
    model = MLPClassifier(hidden=16)
    state = model.state_dict()
    flat = interpolation_curve(model, state, state, DigitsFullTaskPool(), points=3, limit=50)
    assert [p["t"] for p in flat] == [0.0, 0.5, 1.0]
    assert loss_barrier(flat) == pytest.approx(0.0, abs=1e-6)
