"""The independent pool `digits-mlp_seeds`: accurate classifiers from different inits, built deterministically."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergebench_core import PRETRAINED
from mergebench_core.evaluation import evaluate
from mergebench_core.registry import get_registry
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
