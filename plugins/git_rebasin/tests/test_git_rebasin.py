"""Git Re-Basin on independently trained digit classifiers: alignment is what makes their average work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergebench_core import MergebenchError, ModelPool, RunContext
from mergebench_core.fusion.alignment import apply_permutation
from mergebench_core.data.evaluation import evaluate
from mergebench_core.contract.registry import get_registry
from mergebench_digits_seeds import DigitsFullTaskPool, DigitsSeedsModelPool, MLPClassifier, SeedsRecipe
from mergebench_git_rebasin import GitRebasin, Params


@pytest.fixture(scope="module")
def seeds_pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-seeds")
    return DigitsSeedsModelPool(SeedsRecipe(), root), DigitsFullTaskPool(SeedsRecipe())


def accuracy(taskpool: DigitsFullTaskPool, model: nn.Module) -> float:
    return evaluate(taskpool, model)["digits"]["accuracy"]


def test_aligned_average_beats_the_naive_average_by_a_wide_margin(seeds_pools, tmp_path):
    """Measured on the default recipe (one CPU thread): seed0 97.7 %, seed1 97.7 %, naive average 71.7 %,
    git_rebasin 92.1 %."""
    pool, tasks = seeds_pools
    out = GitRebasin().run(pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    states = [pool.state_dict(n) for n in pool.expert_names]
    naive = pool.load_model("seed0")
    naive.load_state_dict({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    fused, plain = accuracy(tasks, out.model), accuracy(tasks, naive)
    assert fused > 0.9 and fused - plain > 0.08, (fused, plain)
    moved = out.extras["units_moved"]["seed1"]
    assert set(moved) == {"P_fc1", "P_fc2"} and min(moved.values()) > 100  # unrelated inits: nearly every unit moves
    assert out.extras["reference"] == "seed0"


class StatePool(ModelPool):
    """Two MLP classifiers given as state dicts, with or without the digits pool's permutation spec."""

    name = "in-memory"
    relation = "independent"
    has_pretrained = False

    def __init__(self, states: dict[str, dict[str, torch.Tensor]], spec=None):
        self.states, self.spec = states, spec

    @property
    def expert_names(self) -> list[str]:
        return list(self.states)

    def load_model(self, name: str) -> nn.Module:
        model = MLPClassifier()
        model.load_state_dict(self.states[name])
        return model.eval()

    def permutation_spec(self):
        return self.spec


def test_fusing_a_model_with_a_permuted_copy_of_itself_gives_the_same_function(seeds_pools, tmp_path):
    pool, tasks = seeds_pools
    spec = pool.permutation_spec()
    state = pool.state_dict("seed0")
    g = torch.Generator().manual_seed(0)
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}
    twin = StatePool({"a": state, "b": apply_permutation(spec, state, perms)}, spec)
    out = GitRebasin().run(twin, RunContext(taskpool=tasks, seed=3, cache_dir=tmp_path))
    x, _ = tasks.data.split("digits", "test")
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), pool.load_model("seed0")(x), atol=1e-5, rtol=1e-5)
    assert all(n > 100 for n in out.extras["units_moved"]["b"].values())


def test_a_pool_without_a_permutation_spec_is_refused(seeds_pools, tmp_path):
    pool, _ = seeds_pools
    bare = StatePool({n: pool.state_dict(n) for n in pool.expert_names})
    reason = GitRebasin.refusal(bare, Params())
    assert reason is not None and "declares no permutation spec" in reason and "permutation_spec()" in reason
    assert GitRebasin.refusal(pool, Params()) is None
    with pytest.raises(MergebenchError, match="no permutation spec"):
        GitRebasin().run(bare, RunContext(cache_dir=tmp_path))


def test_params_are_validated_and_the_method_is_registered():
    with pytest.raises(ValueError, match="matching must be one of weight, activation, got 'soft'"):
        Params(matching="soft")
    with pytest.raises(ValueError, match="num_fusion_samples"):
        Params(num_fusion_samples=0)
    with pytest.raises(ValueError, match="max_iter"):
        Params(max_iter=0)
    assert get_registry().method("git_rebasin") is GitRebasin


def random_model(arch: str):
    from mergebench_digits_archs import CNNClassifier, ViTClassifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = {"cnn": CNNClassifier, "vit": ViTClassifier}[arch]()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("matching", ["weight", "activation"])
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_channels_and_heads_of_a_permuted_copy_are_realigned(arch, matching, seeds_pools, tmp_path):
    from mergebench_core.pools.states import StateDictPool

    _, tasks = seeds_pools
    model = random_model(arch)
    spec = model.permutation_spec()
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}
    pool = StateDictPool(type(model), {"a": state, "b": apply_permutation(spec, state, perms)}, spec)
    out = GitRebasin(Params(matching=matching)).run(pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    x, _ = tasks.data.split("digits", "test")
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_activation_matching_beats_the_naive_average(seeds_pools, tmp_path):
    """Measured on the default recipe: naive average 71.7 %, weight matching 92.1 %, activation matching 95.1 %."""
    pool, tasks = seeds_pools
    out = GitRebasin(Params(matching="activation")).run(pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    assert accuracy(tasks, out.model) > 0.93 and out.extras["matching"] == "activation"
    spec = pool.permutation_spec()
    bare = StatePool({n: pool.state_dict(n) for n in pool.expert_names},
                     type(spec)(spec.axes))  # no activation points
    assert "names no activation point" in GitRebasin.refusal(bare, Params(matching="activation"))
    assert GitRebasin.refusal(bare, Params()) is None
