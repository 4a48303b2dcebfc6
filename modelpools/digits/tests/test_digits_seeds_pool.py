"""The independent pool `digits-mlp_seeds`: accurate classifiers from different inits, built deterministically."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergebench_core import PRETRAINED
from mergebench_core.data.evaluation import evaluate
from mergebench_core.contract.registry import get_registry
from mergebench_digits import DigitsData, Recipe
from mergebench_digits_seeds import DigitsFullTaskPool, DigitsSeedsModelPool, SeedsRecipe, build


@pytest.fixture(scope="module")
def seeds_pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-seeds")
    return DigitsSeedsModelPool(SeedsRecipe(), root), DigitsFullTaskPool(SeedsRecipe())


def test_each_model_is_an_accurate_classifier_of_its_own(seeds_pools):
    pool, tasks = seeds_pools
    assert pool.expert_names == ["seed0", "seed1"] and pool.relation == "independent" and not pool.has_pretrained
    for name in pool.expert_names:
        assert pool.task_of(name) == "digits"
        assert evaluate(tasks, pool.load_model(name))["digits"]["accuracy"] > 0.95, name
    a, b = (pool.state_dict(n) for n in pool.expert_names)
    assert not torch.allclose(a["fc1.weight"], b["fc1.weight"], atol=0.05)  # different inits, not one model twice
    with pytest.raises(KeyError, match="no pretrained model"):
        pool.load_model(PRETRAINED)


def test_the_permutation_spec_fits_the_models(seeds_pools):
    pool, _ = seeds_pools
    spec = pool.permutation_spec()
    assert spec.sizes(pool.state_dict("seed0")) == {"P_fc1": 128, "P_fc2": 128}
    assert spec.axes["fc3.weight"] == (None, "P_fc2")  # the class logits stay in place


def test_build_is_deterministic_and_keyed_by_recipe(tmp_path):
    small = dataclasses.replace(SeedsRecipe(), steps=5)
    build(small, tmp_path / "a")
    build(small, tmp_path / "b")
    for name in ("seed0", "seed1"):
        assert (tmp_path / "a" / f"{name}.safetensors").read_bytes() == \
            (tmp_path / "b" / f"{name}.safetensors").read_bytes(), name
    assert small.digest() != SeedsRecipe().digest()
    assert dataclasses.replace(SeedsRecipe(), num_models=3).digest() != SeedsRecipe().digest()


def test_the_task_pool_has_the_ta8_split_and_a_val_slice_of_train(seeds_pools):
    pool, tasks = seeds_pools
    assert tasks.tasks == ["digits"]
    ta8 = DigitsData(Recipe())
    x_test, y_test = ta8.split("digits", "test")
    got = torch.cat([x for x, _ in tasks.batches("digits", "test", batch_size=100)])
    assert torch.equal(got, x_test) and tasks.num_examples("digits", "test") == 597
    x_train, _ = tasks.data.split("digits", "train")
    x_val, _ = next(iter(tasks.batches("digits", "val", batch_size=1000)))
    assert len(x_val) == 120 and all(bool((x_train == row).all(1).any()) for row in x_val)
    model = pool.load_model("seed0")
    with torch.no_grad():
        assert torch.equal(tasks.logits(model, "digits", x_test[:5]), model(x_test[:5]))


def test_both_pools_are_registered_by_the_digits_distribution():
    registry = get_registry()
    assert registry.modelpool("digits-mlp_seeds").distribution == "mergebench-digits"
    assert registry.taskpool("digits_full").obj is DigitsFullTaskPool
    assert registry.modelpool("digits-mlp_seeds").obj().default_taskpool == "digits_full"


def test_twelve_independent_pools_are_registered_with_their_recipes():
    from mergebench_digits_seeds import POOLS

    registry = get_registry()
    names = [f"digits-{a}_{s}" for a in ("mlp", "cnn", "vit") for s in ("seeds", "split2", "split4", "shard2")]
    assert sorted(POOLS) == sorted(names)
    for name in names:
        pool = registry.modelpool(name).obj()
        assert pool.name == name and pool.relation == "independent" and pool.default_taskpool == "digits_full"
    split4 = POOLS["digits-cnn_split4"]()
    assert (split4.recipe.arch, split4.recipe.setting, split4.recipe.num_models) == ("cnn", "split", 4)
    assert split4.expert_names == ["seed0", "seed1", "seed2", "seed3"]
    assert POOLS["digits-mlp_seeds"]().recipe == SeedsRecipe()  # the original pool keeps its recipe
    assert registry.modelpool("fusion-folder").distribution == "mergebench-digits"


def test_settings_split_the_train_split_as_documented():
    from mergebench_digits_seeds import train_subsets

    _, y = SeedsRecipe().data().split("digits", "train")
    full = train_subsets(SeedsRecipe(), y)
    assert all(torch.equal(p, torch.arange(len(y))) for p in full)
    for setting, k in (("shard", 2), ("split", 2), ("split", 4)):
        parts = train_subsets(dataclasses.replace(SeedsRecipe(), setting=setting, num_models=k), y)
        assert len(parts) == k
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(y)))  # disjoint, covering train once
        shares = torch.stack([torch.bincount(y[p], minlength=10) for p in parts]).float()
        shares = shares / shares.sum(0)
        if setting == "shard":
            assert abs(len(parts[0]) - len(parts[1])) <= 1 and shares.max() < 0.7  # random halves
        else:  # label-skewed: some model gets far more than its 1/k of some class
            assert shares.max() > 1.5 / k
    other = train_subsets(dataclasses.replace(SeedsRecipe(), setting="split", seed=1), y)
    assert not torch.equal(other[0], train_subsets(dataclasses.replace(SeedsRecipe(), setting="split"), y)[0])


def test_pool_seeds_give_other_models_under_the_same_name(tmp_path):
    pool = DigitsSeedsModelPool(dataclasses.replace(SeedsRecipe(), steps=5), tmp_path)
    pool.name = "digits-mlp_seeds"
    assert pool.for_seed(0) is pool
    other = pool.for_seed(2)
    assert other.name == pool.name and other.recipe.seed == 2 and other is pool.for_seed(2)
    assert other.version_info()["digits_seeds_recipe"] != pool.version_info()["digits_seeds_recipe"]
    assert not torch.equal(other.state_dict("seed0")["fc1.weight"], pool.state_dict("seed0")["fc1.weight"])
    assert not torch.equal(other.state_dict("seed0")["fc1.weight"], pool.state_dict("seed1")["fc1.weight"])


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_cnn_and_vit_pools_build_deterministically_with_a_fitting_spec(arch, tmp_path):
    recipe = SeedsRecipe.preset(arch, "split2", steps=3)
    build(recipe, tmp_path / "a")
    build(recipe, tmp_path / "b")
    for name in ("seed0", "seed1"):
        assert (tmp_path / "a" / f"{name}.safetensors").read_bytes() == \
            (tmp_path / "b" / f"{name}.safetensors").read_bytes(), name
    pool = DigitsSeedsModelPool(recipe, tmp_path)
    model = pool.load_model("seed0")
    pool.permutation_spec().validate_model(model)
    assert [lv.module for lv in pool.permutation_spec().levels][-1] in ("fc", "head")
    info = pool.build_info()
    assert sum(m["examples"] for m in info["models"].values()) == 1200 and info["seconds"] > 0
    assert len(info["models"]["seed0"]["class_counts"]) == 10
    x, _ = DigitsFullTaskPool(recipe).data.split("digits", "test")
    with torch.no_grad():
        assert model(x[:3]).shape == (3, 10)
