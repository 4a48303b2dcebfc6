"""The mergeability regularisers' known answers: R2's gradient, R3's gradient against finite differences, λ = 0 is
plain fine-tuning bit for bit, the lazy R3 schedule, the guide's names, and the CLIP preset on a tiny CLIP."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from mergebench_finetune import Finetune
from mergebench_finetune import Params as FinetuneParams
from mergebench_mergeability import THETA0, Mergeability, Params, grad_magnitude, moderate_update
from torch import nn

from mergebench_core import PRETRAINED
from mergebench_core.running.loggers import log_path, read_log
from mergebench_core.training.loop import TrainConfig, TrainState, train


class TinyTaskPool:
    """Just enough of a task pool for a loss: the model's output are the logits of task "t"."""

    tasks: ClassVar[list[str]] = ["t"]

    def logits(self, model, task, inputs):
        return model(inputs)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def state_for(step: int = 1, theta0=None) -> TrainState:
    state = TrainState(step, ("t",), torch.device("cpu"), torch.Generator(), TinyTaskPool(), TrainConfig())
    if theta0 is not None:
        state.extras[THETA0] = theta0
    return state


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_r2_gradient_is_two_lambda_times_the_update():
    net = tiny_net()
    params = list(net.parameters())
    theta0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    x, y = tiny_batch()
    lam = 0.37
    method = Mergeability(Params(enable_moderate_update=True, lambda_moderate_update=lam))
    total, metrics = method.loss(net, {"t": (x, y)}, state_for(5, theta0))
    plain = F.cross_entropy(net(x), y)
    got = flat_grad(total, params) - flat_grad(plain, params)
    expected = torch.cat([2 * lam * (p - p0).reshape(-1) for p, p0 in zip(params, theta0)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    update_sq = sum(float((p - p0).detach().pow(2).sum()) for p, p0 in zip(params, theta0))
    assert metrics["raw/moderate_update/t"] == pytest.approx(update_sq)
    assert metrics["reg/moderate_update/t"] == pytest.approx(lam * update_sq)
    assert metrics["reg/total/t"] == pytest.approx(lam * update_sq)
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + lam * update_sq)
    assert float(moderate_update(params, theta0).detach()) == pytest.approx(update_sq)


def _values(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _set(net: nn.Module, flat: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()


def test_r3_gradient_matches_finite_differences():
    net = tiny_net(2)
    params = list(net.parameters())
    x, y = tiny_batch(3)

    def r3() -> torch.Tensor:
        return grad_magnitude(F.cross_entropy(net(x), y), list(net.parameters()), create_graph=True)

    analytic = flat_grad(r3(), params)
    point, eps = _values(net), 1e-6
    numeric = torch.zeros_like(point)
    for i in range(len(point)):
        for sign in (1, -1):
            moved = point.clone()
            moved[i] += sign * eps
            _set(net, moved)
            numeric[i] += sign * float(r3().detach()) / (2 * eps)
    _set(net, point)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert analytic.abs().max() > 1e-3  # a real gradient, not zeros on both sides


def test_the_r3_loss_is_task_loss_plus_lambda_times_the_squared_gradient_norm_and_differentiates_through_it():
    net = tiny_net(4)
    params = list(net.parameters())
    x, y = tiny_batch(5)
    lam = 0.5
    method = Mergeability(Params(enable_grad_magnitude=True, lambda_grad_magnitude=lam))
    state = state_for(1)

    def total() -> torch.Tensor:
        return method.loss(net, {"t": (x, y)}, state)[0]

    loss = total()
    ce = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(ce, params)
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) + lam * sum(float(t.pow(2).sum()) for t in g))
    analytic = flat_grad(loss, params)
    point, eps = _values(net), 1e-6
    numeric = torch.zeros_like(point)
    for i in range(len(point)):
        for sign in (1, -1):
            moved = point.clone()
            moved[i] += sign * eps
            _set(net, moved)
            numeric[i] += sign * float(total().detach()) / (2 * eps)
    _set(net, point)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_grad_magnitude_every_k_steps_is_weighted_by_k():
    net = tiny_net()
    x, y = tiny_batch()
    method = Mergeability(Params(enable_grad_magnitude=True, lambda_grad_magnitude=0.1, grad_magnitude_every=3))
    state = state_for(1)
    seen = {}
    for step in range(1, 8):
        state.step = step
        loss, metrics = method.loss(net, {"t": (x, y)}, state)
        seen[step] = metrics
        if "raw/grad_magnitude/t" in metrics:
            raw = metrics["raw/grad_magnitude/t"]
            assert metrics["reg/grad_magnitude/t"] == pytest.approx(0.1 * raw)
            assert metrics["reg/total/t"] == pytest.approx(3 * 0.1 * raw)
            assert float(loss.detach()) == pytest.approx(metrics["loss/train/t"] + 3 * 0.1 * raw)
        else:
            assert metrics["reg/total/t"] == 0.0 and float(loss.detach()) == pytest.approx(metrics["loss/train/t"])
    assert [s for s, m in seen.items() if "raw/grad_magnitude/t" in m] == [1, 4, 7]


def test_params_refuse_negative_lambdas_and_bad_values():
    for bad in ({"lambda_moderate_update": -0.1}, {"lambda_grad_magnitude": -1.0},
                {"lambda_grad_magnitude": float("nan")}, {"grad_magnitude_every": 0}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            Params(**bad)


def test_suffixes_are_the_guides_checkpoint_suffixes():
    assert Mergeability.suffix(Params()) == ""
    assert Mergeability.suffix(Params(enable_moderate_update=True)) == "_moderate_update"
    assert Mergeability.suffix(Params(enable_grad_magnitude=True)) == "_grad_magnitude"
    assert Mergeability.suffix(Params(enable_moderate_update=True, enable_grad_magnitude=True)) == \
        "_moderate_update_grad_magnitude"


def test_the_clip_preset_is_fusionbenchs_recipe():
    config = Mergeability(Params(**Mergeability.presets["clip"])).train_config()
    assert (config.optimizer, config.lr, config.steps, config.batch_size, config.schedule, config.weight_decay) == \
        ("adam", 1e-5, 4000, 32, "cosine", 0.0)
    default = Mergeability(Params(**Mergeability.presets["embedded"])).train_config()
    assert (default.optimizer, default.lr, default.steps, default.batch_size) == ("adam", 3e-4, 200, 64)


def test_lambda_zero_reproduces_plain_fine_tuning_bit_for_bit(digits_pools):
    pool, taskpool = digits_pools
    config = TrainConfig(steps=12, lr=3e-4, batch_size=32)
    plain = pool.load_model(PRETRAINED)
    train(plain, taskpool, ["rot90"], Finetune(FinetuneParams()).loss, config, seed=5)
    logged = []
    zero = pool.load_model(PRETRAINED)
    method = Mergeability(Params(enable_moderate_update=True, lambda_moderate_update=0.0,
                                 enable_grad_magnitude=True, lambda_grad_magnitude=0.0))
    train(zero, taskpool, ["rot90"], method.loss, config, seed=5, log_metrics=lambda s, m: logged.append(m))
    for (name, a), (_, b) in zip(plain.state_dict().items(), zero.state_dict().items()):
        assert torch.equal(a, b), name
    # the switched-on terms were measured (and logged) though not applied
    assert logged[-1]["raw/moderate_update/rot90"] > 0 and logged[-1]["raw/grad_magnitude/rot90"] > 0
    assert logged[-1]["reg/total/rot90"] == 0.0
    assert logged[-1]["loss"] == logged[-1]["loss/train/rot90"]
    # and a positive λ₂ does change the weights
    regularised = pool.load_model(PRETRAINED)
    train(regularised, taskpool, ["rot90"],
          Mergeability(Params(enable_moderate_update=True, lambda_moderate_update=1.0)).loss, config, seed=5)
    assert not torch.equal(regularised.state_dict()["fc1.weight"], plain.state_dict()["fc1.weight"])


def test_derived_pool_experts_with_lambda_zero_equal_finetunes(cli_env, session_cache, monkeypatch):
    """Through the runner, the cache and the derived pools: the same experts as `finetune`, and the curves with
    the guide's names beside the store."""
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    runner = Runner(get_registry(), None, RunOptions(cache_dir=cache))
    runner.store = ResultStore(cli_env / "results.sqlite")
    plain = runner.modelpool("digits-mlp_TA8+finetune(steps=8)").state_dict("parity")
    name = ("digits-mlp_TA8+mergeability(steps=8,enable_moderate_update=true,lambda_moderate_update=0.0,"
            "enable_grad_magnitude=true,lambda_grad_magnitude=0.0)")
    zero = runner.modelpool(name).state_dict("parity")
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    curve = read_log(log_path(cli_env / "results.sqlite", f"derived/{name}/parity"))
    assert len(curve) == 8
    assert {"loss/train/parity", "acc/train/parity", "reg/moderate_update/parity", "reg/grad_magnitude/parity",
            "reg/total/parity"} <= set(curve[0])


def test_the_clip_preset_trains_a_tiny_clip_vision_tower_with_both_regularisers(tmp_path, monkeypatch):
    """A few steps of the CLIP recipe (its optimizer and schedule, shorter and with small batches) with R2 and R3
    on a tiny random CLIP, offline: double backward through the vision transformer's attention."""
    pytest.importorskip("transformers")
    from mergebench_clip_tasks.testing import build_offline_world, write_tiny_dataset

    from mergebench_core import registry as registry_module
    from mergebench_core.running.runner import Runner, RunOptions
    from mergebench_core.results.store import ResultStore

    world = build_offline_world(tmp_path / "world", "b32", "TA8", n_images=4)
    task = world.tasks[0]
    write_tiny_dataset(world.data_dir, task, 12, seed=7, split="train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world.hub_cache))
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "clip,clip_tasks,mergeability")
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    preset = {**Mergeability.presets["clip"], "steps": 3, "batch_size": 4}
    params = ",".join(f"{k}={v}" for k, v in preset.items())
    name = f"clip-vit-b32_TA8+mergeability({params},enable_moderate_update=true,enable_grad_magnitude=true," \
           f"lambda_moderate_update=0.5)"
    runner = Runner(registry_module.get_registry(), None, RunOptions(device="cpu", cache_dir=tmp_path / "cache"))
    runner.store = ResultStore(tmp_path / "results.sqlite")
    derived = runner.modelpool(name)
    before = derived.state_dict(PRETRAINED)
    after = derived.state_dict(task)
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])]
    assert changed and all(torch.isfinite(after[k]).all() for k in changed)
    curve = read_log(log_path(tmp_path / "results.sqlite", f"derived/{name}/{task}"))
    assert [row["step"] for row in curve] == [1, 2, 3]
    assert curve[-1]["raw/grad_magnitude/" + task] > 0 and curve[-1]["raw/moderate_update/" + task] > 0
    assert curve[0]["lr"] == pytest.approx(1e-5) and curve[-1]["lr"] < 1e-5  # cosine decay


def test_its_parameters_are_the_core_training_fields_and_refuse_a_typo():
    import dataclasses

    import pytest

    from mergebench_core.training.params import TrainingParams, UnknownTrainingField
    from mergebench_mergeability import Params

    core = [f.name for f in dataclasses.fields(TrainingParams)]
    assert [f.name for f in dataclasses.fields(Params)][:len(core)] == core
    with pytest.raises(UnknownTrainingField, match="Did you mean 'lr'"):
        Params(lrr=1e-4)
