"""OTFusion against known answers (the identity plan, a permuted copy), and against naive averaging."""

from __future__ import annotations

import pytest
import torch
from mergebench_digits_archs import CNNClassifier, MLPClassifier, ViTClassifier
from mergebench_digits_seeds import DigitsFullTaskPool, DigitsSeedsModelPool, SeedsRecipe
from mergebench_otfusion import OTFusion, Params, barycentric_map, transport_plan

from mergebench_core import MergebenchError, RunContext
from mergebench_core.fusion.alignment import PermutationSpec, apply_permutation
from mergebench_core.data.evaluation import evaluate
from mergebench_core.pools.states import StateDictPool
from mergebench_core.contract.registry import get_registry

ARCHS = {"mlp": MLPClassifier, "cnn": CNNClassifier, "vit": ViTClassifier}


@pytest.fixture(scope="module")
def tasks():
    return DigitsFullTaskPool()


@pytest.fixture(scope="module")
def mlp_pool(session_cache):
    return DigitsSeedsModelPool(SeedsRecipe(), session_cache / "pools" / "digits-seeds")


def random_model(arch: str) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ARCHS[arch]()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def twins(model) -> StateDictPool:
    spec = model.permutation_spec()
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}
    return StateDictPool(type(model), {"a": state, "b": apply_permutation(spec, state, perms)}, spec)


def test_ot_between_identical_neuron_sets_is_the_identity_plan():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    uniform = torch.full((12,), 1 / 12, dtype=torch.float64)
    plan = transport_plan(torch.cdist(x, x), uniform, uniform)
    torch.testing.assert_close(plan, torch.eye(12, dtype=torch.float64) / 12)
    torch.testing.assert_close(barycentric_map(plan, uniform), torch.eye(12, dtype=torch.float64))
    soft = transport_plan(torch.cdist(x, x), uniform, uniform, "sinkhorn", 1e-3)
    torch.testing.assert_close(soft.sum(0), uniform, atol=1e-6, rtol=0)
    assert bool((soft.argmax(1) == torch.arange(12)).all())  # mass stays mostly on the diagonal
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    moved = transport_plan(torch.cdist(x[perm], x), uniform, uniform)
    assert torch.equal(moved.argmax(1), perm)


@pytest.mark.parametrize("cost", ["weight", "activation"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "vit"])
def test_fusing_a_model_with_a_permuted_copy_of_itself_gives_the_same_function(arch, cost, mlp_pool, tasks, tmp_path):
    model = mlp_pool.load_model("seed0") if arch == "mlp" else random_model(arch)
    out = OTFusion(Params(cost=cost)).run(twins(model), RunContext(taskpool=tasks, tasks=("digits",),
                                                                   cache_dir=tmp_path))
    x, _ = tasks.data.split("digits", "test")
    with torch.no_grad():
        assert float((out.model(x) - model(x)).abs().max()) < 1e-4
    assert all(v["permutation"] for v in out.extras["transport"]["b"].values())


def test_otfusion_beats_naive_averaging_by_a_wide_margin(mlp_pool, tasks, tmp_path):
    """Measured on the default recipe: naive average 71.7 %, weight cost 93.5 %, activation cost 97.2 %."""
    states = [mlp_pool.state_dict(n) for n in mlp_pool.expert_names]
    naive = mlp_pool.load_model("seed0")
    naive.load_state_dict({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    plain = evaluate(tasks, naive)["digits"]["accuracy"]
    ctx = RunContext(taskpool=tasks, tasks=("digits",), cache_dir=tmp_path)
    for params in (Params(), Params(cost="activation"), Params(solver="sinkhorn"), Params(importance="activation")):
        fused = evaluate(tasks, OTFusion(params).run(mlp_pool, ctx).model)["digits"]["accuracy"]
        assert fused - plain > 0.15, (params, fused, plain)


def test_activation_costs_need_points_and_params_are_validated(mlp_pool):
    spec = MLPClassifier.permutation_spec()
    bare = StateDictPool(MLPClassifier, {n: mlp_pool.state_dict(n) for n in mlp_pool.expert_names},
                         PermutationSpec(spec.axes))
    assert OTFusion.refusal(bare, Params()) is None
    assert "names no activation point" in OTFusion.refusal(bare, Params(cost="activation"))
    with pytest.raises(MergebenchError, match="use otfusion.cost=weight"):
        OTFusion(Params(cost="activation")).run(bare, RunContext(taskpool=DigitsFullTaskPool()))
    with pytest.raises(ValueError, match="solver must be one of emd, sinkhorn"):
        Params(solver="exact")
    with pytest.raises(ValueError, match="sinkhorn_reg"):
        Params(sinkhorn_reg=0)
    assert get_registry().method("otfusion") is OTFusion
