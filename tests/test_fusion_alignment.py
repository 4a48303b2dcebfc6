"""Alignment beyond chains of Linear layers: block permutations (attention heads), transport maps, activation matching
and activation points on the CNN and ViT of the independent digits pools."""

from __future__ import annotations

import pytest
import torch
from mergebench_digits_archs import CNNClassifier, MLPClassifier, ViTClassifier
from mergebench_digits_seeds import DigitsFullTaskPool

from mergebench_core import MergebenchError
from mergebench_core.fusion.alignment import (
    Level,
    PermutationSpec,
    activation_matching,
    apply_permutation,
    apply_transport,
    collect_activations,
    unit_activations,
    unit_vectors,
    weight_matching,
)
from mergebench_core.data.statistics import StatsCache

ARCHS = {"mlp": MLPClassifier, "cnn": CNNClassifier, "vit": ViTClassifier}


def random_model(arch: str, seed: int) -> torch.nn.Module:
    """An untrained model whose every tensor (LayerNorms, class token, positions included) is random, so that a wrong
    permutation of any of them changes the function."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHS[arch]()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_perms(spec: PermutationSpec, state, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}


def digits(n: int = 64) -> torch.Tensor:
    return DigitsFullTaskPool().data.split("digits", "test")[0][:n]


@pytest.mark.parametrize("arch", ["mlp", "cnn", "vit"])
def test_each_architecture_spec_permutes_without_changing_the_function(arch):
    model = random_model(arch, 0)
    spec = model.permutation_spec()
    spec.validate_model(model)
    state = model.state_dict()
    perms = random_perms(spec, state, 1)
    twin = ARCHS[arch]().eval()
    twin.load_state_dict(apply_permutation(spec, state, perms))
    x = digits()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(twin.state_dict()[next(iter(spec.axes))], state[next(iter(spec.axes))])


def test_head_permutations_move_whole_heads():
    model = random_model("vit", 0)
    spec = model.permutation_spec()
    state = model.state_dict()
    assert spec.sizes(state)["P_heads0"] == 4 and spec.block("P_heads0") == 16 and spec.sizes(state)["P_res"] == 64
    perm = torch.tensor([2, 0, 3, 1])
    moved = apply_permutation(spec, state, {"P_heads0": perm})
    q = state["blocks.0.attn.q.weight"].reshape(4, 16, -1)
    torch.testing.assert_close(moved["blocks.0.attn.q.weight"].reshape(4, 16, -1), q[perm])
    o = state["blocks.0.attn.o.weight"].reshape(-1, 4, 16)
    torch.testing.assert_close(moved["blocks.0.attn.o.weight"].reshape(-1, 4, 16), o[:, perm])
    with pytest.raises(MergebenchError, match="not a multiple of 5"):
        PermutationSpec(spec.axes, blocks={**spec.blocks, "P_heads0": 5}).validate(state)
    with pytest.raises(ValueError, match="name permutations that no axis carries"):
        PermutationSpec(spec.axes, blocks={"P_nope": 2})


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_weight_matching_recovers_a_planted_permutation_of_channels_and_heads(arch):
    model = random_model(arch, 3)
    spec = model.permutation_spec()
    state = model.state_dict()
    planted = random_perms(spec, state, 4)
    found = weight_matching(spec, state, apply_permutation(spec, state, planted))
    for p, perm in planted.items():
        assert torch.equal(found[p], torch.argsort(perm)), p


def test_transport_with_one_hot_maps_is_the_permutation_and_soft_maps_mix_units():
    model = random_model("vit", 5)
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = random_perms(spec, state, 6)
    maps = {p: torch.eye(len(perm), dtype=torch.float64)[perm] for p, perm in perms.items()}
    moved, expected = apply_transport(spec, state, maps), apply_permutation(spec, state, perms)
    for k in state:
        torch.testing.assert_close(moved[k], expected[k], atol=1e-6, rtol=1e-6)
    half = torch.full((4, 4), 0.25, dtype=torch.float64)  # every target head the mean of the four heads
    mixed = apply_transport(spec, state, {"P_heads0": half})
    mean_head = state["blocks.0.attn.v.weight"].reshape(4, 16, -1).mean(0)
    torch.testing.assert_close(mixed["blocks.0.attn.v.weight"].reshape(4, 16, -1)[2], mean_head)
    with pytest.raises(MergebenchError, match="must be \\(target units, 4\\)"):
        apply_transport(spec, state, {"P_heads0": torch.eye(3)})


@pytest.mark.parametrize("arch", ["mlp", "cnn", "vit"])
def test_activation_matching_recovers_a_planted_permutation(arch, tmp_path):
    model = random_model(arch, 7)
    spec = model.permutation_spec()
    state = model.state_dict()
    planted = random_perms(spec, state, 8)
    twin = ARCHS[arch]().eval()
    twin.load_state_dict(apply_permutation(spec, state, planted))
    tasks = DigitsFullTaskPool()
    cache = StatsCache(tmp_path)
    za = unit_activations(spec, model, tasks, ["digits"], n_examples=128, cache=cache, model_identity="a")
    zb = unit_activations(spec, twin, tasks, ["digits"], n_examples=128, cache=cache, model_identity="b")
    found = activation_matching(spec, za, zb)
    for p, perm in planted.items():
        # a unit that is constant on every input (a dead ReLU channel of this untrained CNN) matches any other
        # constant unit equally well; every other unit is recovered exactly
        alive = unit_vectors(za[p], spec.block(p)).std(1) > 0
        assert alive.sum() > len(alive) // 2
        assert torch.equal(found[p][alive], torch.argsort(perm)[alive]), p
    unit_activations(spec, model, tasks, ["digits"], n_examples=128, cache=cache, model_identity="a")
    assert cache.hits == len({m for ms in spec.points.values() for m in ms})  # the second call ran no forward pass


def test_channel_points_have_one_row_per_example_and_position():
    model = random_model("cnn", 0)
    spec = model.permutation_spec()
    acts = collect_activations(model, DigitsFullTaskPool(), ["digits"], ["relu1", "conv3"], n_examples=10,
                               feature_axes=spec.feature_axes)
    assert acts["relu1"].shape == (10 * 8 * 8, 16) and acts["conv3"].shape == (10 * 2 * 2, 64)
    x = DigitsFullTaskPool().data.split("digits", "train")[0][:10]  # activations come from the train split
    with torch.no_grad():
        direct = model.relu1(model.conv1(x.reshape(-1, 1, 8, 8)))
    torch.testing.assert_close(acts["relu1"], direct.permute(0, 2, 3, 1).reshape(-1, 16))
    assert unit_vectors(torch.arange(12.0).reshape(2, 6), 3).tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]


def test_specs_without_points_or_with_unknown_modules_say_what_to_add():
    model = random_model("mlp", 0)
    bare = PermutationSpec(model.permutation_spec().axes)
    with pytest.raises(MergebenchError, match="no activation point for \\['P_fc1', 'P_fc2'\\]"):
        unit_activations(bare, model, DigitsFullTaskPool(), ["digits"], n_examples=4)
    wrong = PermutationSpec(bare.axes, points={"P_fc1": "fc9"}, levels=[Level("fc1"), "fc7"])
    assert wrong.levels[1] == Level("fc7")
    with pytest.raises(MergebenchError, match="modules \\['fc7', 'fc9'\\] that the model lacks"):
        wrong.validate_model(model)
