"""The embedded pools take parameters: a fine-tuning variant is its own pool (name, cache, experts), and the
defaults are the pools as they always were."""

import dataclasses
import hashlib
import json

import torch
from mergebench_digits import GENERATOR_FILE, DigitsModelPool, DigitsPoolParams, Recipe, build, ensure_built
from mergebench_digits_seeds import SeedsRecipe

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.pools.params import make_pool
from mergebench_core.pools.views import PoolName
from mergebench_core.contract.registry import get_registry
from mergebench_core.results.store import ResultStore

POOL = "digits-mlp_TA8"
VARIANT = "digits-mlp_TA8(lr=3e-05,steps=20)"


def test_the_defaults_are_the_registered_pool():
    reg = get_registry().modelpool(POOL)
    assert reg.params is DigitsPoolParams
    assert DigitsPoolParams().recipe() == Recipe()
    # the default recipe hashes as it did before it had a fine-tuning seed: its cached build and stored rows stay
    before = {k: v for k, v in dataclasses.asdict(Recipe()).items() if k != "finetune_seed"}
    assert Recipe().digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    pool = make_pool(reg, PoolName.parse(f"{POOL}(lr=0.0003,seed=0)"))
    assert pool.name == POOL and pool.recipe == Recipe()


def test_a_variant_is_its_own_recipe_and_keeps_the_pretrained_model():
    variant = DigitsPoolParams(lr=3e-5).recipe()
    assert variant.digest() != Recipe().digest() and variant.pretraining() == Recipe()
    assert DigitsPoolParams(seed=1).recipe().digest() not in (Recipe().digest(), variant.digest())
    default, other = DigitsModelPool(Recipe()), DigitsModelPool(variant)
    other.name = f"{POOL}(lr=3e-05)"
    assert other.identity("digits") != default.identity("digits")  # statistics of the experts are keyed apart
    assert other.identity(PRETRAINED) == default.identity(PRETRAINED)  # the shared encoder's are shared
    assert other.version_info() != default.version_info()


def test_a_variant_built_from_its_pretraining_build_is_a_full_build_bit_for_bit(tmp_path):
    small = dataclasses.replace(Recipe(), pretrain_steps=5, finetune_steps=3, tasks=("digits", "parity"))
    ensure_built(small, tmp_path / "shared")
    for changes in ({"finetune_lr": 1e-3}, {"finetune_seed": 2, "batch_size": 8}):
        variant = dataclasses.replace(small, **changes)
        fast = ensure_built(variant, tmp_path / "shared")  # reuses the pretrained encoder, heads and generator
        build(variant, tmp_path / "full" / variant.digest())
        for name in ("_pretrained_", "digits", "parity", "heads"):
            assert (fast / f"{name}.safetensors").read_bytes() == \
                (tmp_path / "full" / variant.digest() / f"{name}.safetensors").read_bytes(), (changes, name)
        assert (fast / "digits.safetensors").read_bytes() != \
            (tmp_path / "shared" / small.digest() / "digits.safetensors").read_bytes()
    (tmp_path / "shared" / small.digest() / GENERATOR_FILE).unlink()  # a build from before generator states were kept
    for changes in ({"finetune_steps": 4}, {"finetune_steps": 5}):  # then a variant is built in full, as one is
        older = dataclasses.replace(small, **changes)  # when its pretraining build is not there at all
        folder = ensure_built(older, tmp_path / "shared" if changes["finetune_steps"] == 4 else tmp_path / "alone")
        build(older, tmp_path / "full" / older.digest())
        assert (folder / "digits.safetensors").read_bytes() == \
            (tmp_path / "full" / older.digest() / "digits.safetensors").read_bytes()
    assert not (tmp_path / "alone" / small.digest()).exists()  # nothing else is built for it


def test_the_seeds_pools_take_their_training_parameters():
    reg = get_registry().modelpool("digits-cnn_split2")
    assert make_pool(reg, PoolName.parse("digits-cnn_split2")).recipe == SeedsRecipe.preset("cnn", "split2")
    pool = make_pool(reg, PoolName.parse("digits-cnn_split2(steps=5)"))
    assert pool.name == "digits-cnn_split2(steps=5)" and pool.recipe == SeedsRecipe.preset("cnn", "split2", steps=5)
    assert pool.for_seed(1).name == pool.name and pool.for_seed(1).recipe.steps == 5


def test_a_pool_parameter_is_part_of_the_stored_name_and_changes_the_experts(cli_env, capsys):
    run = ["run", "-m", "task_arithmetic", "--isolation", "none", "--columns", "avg"]
    assert main([*run, "-p", "digits-mlp_TA8(steps=20,lr=0.00003)"]) == 0
    assert main([*run, "pool.lr=3e-5", "pool.steps=20"]) == 0  # the default pool, with `pool.` overrides
    assert "1 cells reused" in capsys.readouterr().err
    rows = ResultStore(cli_env / "results.sqlite").all()
    assert {r.modelpool for r in rows} == {VARIANT}
    ta = next(r for r in rows if r.method == "task_arithmetic")
    assert ta.identity["modelpool"]["digits_recipe"] == DigitsPoolParams(lr=3e-5, steps=20).recipe().digest()

    registry = get_registry()
    variant = make_pool(registry.modelpool(POOL), PoolName.parse(VARIANT))
    default = make_pool(registry.modelpool(POOL), PoolName.parse(POOL))
    assert variant.folder != default.folder
    assert torch.equal(variant.state_dict(PRETRAINED)["fc1.weight"], default.state_dict(PRETRAINED)["fc1.weight"])
    assert not torch.equal(variant.state_dict("digits")["fc1.weight"], default.state_dict("digits")["fc1.weight"])

    assert main(["leaderboard", "-p", "digits-mlp_TA8(lr=3e-5,steps=20)", "--columns", "avg"]) == 0
    out = capsys.readouterr().out
    assert f"### {VARIANT} on digits_TA8" in out and "| task_arithmetic" in out
    assert main(["leaderboard", "-p", POOL]) == 0
    assert "no results stored yet" in capsys.readouterr().out  # the default pool's rows are apart


def test_an_unknown_pool_parameter_is_exit_2_with_a_suggestion(cli_env, capsys):
    assert main(["run", "-m", "task_arithmetic", "-p", "digits-mlp_TA8(lrr=3e-5)"]) == 2
    assert "has no parameter 'lrr'. Did you mean 'lr'?" in capsys.readouterr().err
    assert main(["run", "-m", "task_arithmetic", "pool.stesp=3"]) == 2
    assert "Did you mean 'steps'?" in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()


def test_pool_parameters_out_of_bounds_are_exit_2_before_any_build(cli_env, digits_root, capsys):
    for pool, message in (("digits-mlp_TA8(lr=1e308)", "lr must be at most 10.0, got 1e+308"),
                          ("digits-mlp_TA8(steps=1000000000000)", "steps must be at most 1000000"),
                          ("digits-mlp_TA8(batch_size=0)", "batch_size must be at least 1, got 0"),
                          ("digits-mlp_seeds(lr=-1)", "lr must be greater than 0.0, got -1.0")):
        assert main(["run", "-m", "task_arithmetic", "-p", pool]) == 2
        assert message in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()
    assert not (digits_root / dataclasses.replace(Recipe(), finetune_lr=1e308).digest()).exists()  # never built


def test_list_shows_the_pool_parameters(cli_env, capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert ("digits-mlp_TA8: lr: float = 0.0003 (0 < lr <= 10), steps: int = 200 (1 <= steps <= 1000000), "
            "batch_size: int = 64 (1 <= batch_size <= 100000), seed: int = 0 (0 <= seed <= 4294967295)") in out
    assert ("digits-mlp_seeds: lr: float = 0.002 (0 < lr <= 10), steps: int = 600 (1 <= steps <= 1000000), "
            "batch_size: int = 64 (1 <= batch_size <= 100000)") in out
