"""The core's training loop and its data order, on a tiny in-test task pool over random data."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mergebench_core import MergebenchError, TaskPool
from mergebench_core.data.batches import shuffled_batches
from mergebench_core.training.loop import TrainConfig, TrainState, task_losses, train

DIM, HIDDEN, CLASSES = 8, 16, 3
SIZES = {"train": 96, "val": 24, "test": 24}


class ToyTaskPool(TaskPool):
    """Two tasks whose labels a fixed random teacher assigns (learnable); frozen random heads per task."""

    name = "toy"

    def __init__(self, sizes: dict[str, int] = SIZES):
        g = torch.Generator().manual_seed(123)
        self.data = {}
        for task in self.tasks:
            teacher = torch.randn(DIM, CLASSES, generator=g)
            for split, n in sizes.items():
                x = torch.randn(n, DIM, generator=g)
                self.data[task, split] = (x, (x @ teacher).argmax(1))
        self.heads = {t: torch.randn(HIDDEN, CLASSES, generator=g) for t in self.tasks}

    @property
    def tasks(self):
        return ["a", "b"]

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        x, y = self.data[task, split]
        n = len(x) if limit is None else min(limit, len(x))
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]

    def logits(self, model, task, inputs):
        return model(inputs) @ self.heads[task].to(inputs.device)


class IdTaskPool(ToyTaskPool):
    """One task whose examples are their own index, in inputs and labels, to follow the data order."""

    def __init__(self, n: int):
        self.data = {("a", "train"): (torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))}

    @property
    def tasks(self):
        return ["a"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Dropout(0.2), nn.Linear(HIDDEN, HIDDEN))


def _ce(model, batches, state):
    return sum(task_losses(model, batches, state).values())


def _run(seed: int, config: TrainConfig | None = None, loss_fn=_ce, global_seed: int = 999, **kwargs):
    model, logged = _model(), []
    torch.manual_seed(global_seed)  # the global RNG before a run must not matter
    result = train(model, ToyTaskPool(), ["a", "b"], loss_fn, config or TrainConfig(steps=12, batch_size=8),
                   seed=seed, log_metrics=lambda step, m: logged.append((step, dict(m))), **kwargs)
    return model, result, logged


def test_same_seed_gives_identical_weights_and_another_seed_different_ones():
    first, _, _ = _run(seed=0, global_seed=5)
    again, _, _ = _run(seed=0, global_seed=7)
    other, _, _ = _run(seed=1)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not first.training  # handed back in evaluation mode


def test_the_global_rng_is_given_back_untouched():
    model = _model()
    torch.manual_seed(999)
    before = torch.random.get_rng_state()
    train(model, ToyTaskPool(), ["a"], _ce, TrainConfig(steps=3, batch_size=8), seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_data_order_and_the_state_generator_follow_the_seed():
    draws, seen = [], []

    def noisy(model, batches, state):
        draws.append(torch.rand(1, generator=state.generator).item())
        seen.append(torch.cat([batches["a"][0], batches["b"][0]]))
        return _ce(model, batches, state)

    for seed in (3, 3, 4):
        _run(seed=seed, config=TrainConfig(steps=2, batch_size=8), loss_fn=noisy)
    assert draws[:2] == draws[2:4] and draws[:2] != draws[4:]
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[4])


def test_loss_decreases_on_a_learnable_problem():
    config = TrainConfig(steps=80, lr=1e-2, batch_size=16, eval_every=80)
    model, result, logged = _run(seed=0, config=config)
    losses = [m["loss"] for _, m in logged]
    assert len(losses) == 80 and result.final_loss == losses[-1]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert result.val_metrics is not None
    assert min(result.val_metrics["acc/val/a"], result.val_metrics["acc/val/b"]) > 0.6


def test_only_the_given_parameters_move():
    model = _model()
    frozen = model[0].weight.detach().clone()
    train(model, ToyTaskPool(), ["a"], _ce, TrainConfig(steps=3, batch_size=8), seed=0,
          parameters=model[3].parameters())
    assert torch.equal(model[0].weight, frozen)


def _epochs(n, buffer, seed, epochs, batch_size=5):
    gen = torch.Generator().manual_seed(seed)
    batches = list(shuffled_batches(IdTaskPool(n), "a", "train", batch_size=batch_size, generator=gen,
                                    buffer=buffer, epochs=epochs))
    assert all(torch.equal(x.squeeze(1).long(), y) for x, y in batches)  # inputs and labels stay paired
    assert all(0 < len(y) <= batch_size for _, y in batches)
    order = torch.cat([y for _, y in batches])
    assert len(order) == n * epochs
    return [order[i * n:(i + 1) * n] for i in range(epochs)], batches


@pytest.mark.parametrize("buffer", [64, 10], ids=["whole-split", "streaming-buffer"])
def test_shuffled_batches_see_every_example_once_per_epoch_in_a_seeded_order(buffer):
    n = 37
    (one, two, three), _ = _epochs(n, buffer, seed=0, epochs=3)
    for epoch in (one, two, three):
        assert torch.equal(epoch.sort().values, torch.arange(n))
    assert not torch.equal(one, torch.arange(n)) and not torch.equal(one, two)
    assert all(torch.equal(x, y) for x, y in zip(_epochs(n, buffer, seed=0, epochs=3)[0], (one, two, three)))
    assert not torch.equal(_epochs(n, buffer, seed=1, epochs=1)[0][0], one)


def test_shuffled_batches_without_end_continue_the_same_epochs():
    _, finite = _epochs(23, 8, seed=2, epochs=2)
    stream = shuffled_batches(IdTaskPool(23), "a", "train", batch_size=5, buffer=8,
                              generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(y, next(stream)[1]) for _, y in finite)
    assert len(next(stream)[1]) == 5  # and it goes on


def test_shuffled_batches_refuse_bad_arguments():
    gen = torch.Generator()
    with pytest.raises(ValueError):
        next(shuffled_batches(IdTaskPool(4), "a", "train", batch_size=8, buffer=4, generator=gen))
    with pytest.raises(ValueError):
        next(shuffled_batches(IdTaskPool(4), "a", "train", batch_size=2, generator=gen, epochs=0))
    with pytest.raises(MergebenchError, match="no train examples"):
        next(shuffled_batches(IdTaskPool(0), "a", "train", batch_size=2, generator=gen))


def test_schedule_values():
    cosine = TrainConfig(steps=110, lr=0.2, schedule="cosine", warmup_steps=10)
    assert cosine.lr_at(5) == pytest.approx(0.1) and cosine.lr_at(10) == pytest.approx(0.2)
    assert cosine.lr_at(11) == pytest.approx(0.2)  # decay starts at full lr after the warmup
    assert cosine.lr_at(10 + 1 + 50) == pytest.approx(0.1)  # midpoint of the 100 decay steps: lr / 2
    assert 0 < cosine.lr_at(110) < 1e-3
    linear = TrainConfig(steps=20, lr=1.0, schedule="linear")
    assert [linear.lr_at(s) for s in (1, 11, 20)] == pytest.approx([1.0, 0.5, 0.05])
    assert TrainConfig(steps=5, lr=0.3, warmup_steps=2).lr_at(4) == 0.3
    # the optimizer really uses these values at every step
    config = TrainConfig(steps=9, lr=0.05, schedule="cosine", warmup_steps=3, batch_size=8)
    _, _, logged = _run(seed=0, config=config)
    assert [m["lr"] for _, m in logged] == pytest.approx([config.lr_at(s) for s in range(1, 10)])


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_clipping_bounds_the_global_norm_the_optimizer_sees(clip):
    def steep(model, batches, state):  # gradient norm in the thousands
        return 1000.0 * sum(p.sum() for p in model.parameters())

    config = TrainConfig(steps=1, lr=1.0, optimizer="sgd", momentum=0.0, grad_clip=clip, batch_size=8)
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    logged = []
    train(model, ToyTaskPool(), ["a"], steep, config, seed=0, log_metrics=lambda s, m: logged.append(m))
    step = math.sqrt(sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start)))
    if clip:  # sgd with lr 1: the step is the gradient the optimizer saw
        assert step == pytest.approx(clip, rel=1e-4) and logged[0]["grad_norm"] > 1000
    else:
        assert step > 1000 and "grad_norm" not in logged[0]


def test_log_metrics_get_the_expected_steps_and_keys():
    def with_extras(model, batches, state):
        losses = task_losses(model, batches, state)
        return sum(losses.values()), {f"loss/{t}": float(v.detach()) for t, v in losses.items()}

    config = TrainConfig(steps=7, log_every=3, grad_clip=10.0, batch_size=8)
    _, result, logged = _run(seed=0, config=config, loss_fn=with_extras)
    assert [s for s, _ in logged] == [3, 6]
    assert all(set(m) == {"loss", "lr", "grad_norm", "loss/a", "loss/b"} for _, m in logged)
    assert result.steps == 7 and result.val_metrics is None and result.seconds > 0


def test_eval_every_logs_validation_metrics():
    config = TrainConfig(steps=5, eval_every=2, log_every=0, batch_size=8, eval_examples=10)
    _, result, logged = _run(seed=0, config=config)
    assert [s for s, _ in logged] == [2, 4, 5]  # every 2 steps and after the last
    keys = {"acc/val/a", "acc/val/b", "loss/val/a", "loss/val/b"}
    assert all(set(m) == keys for _, m in logged)
    assert result.val_metrics == logged[-1][1]
    assert all(0.0 <= m[k] <= 1.0 for _, m in logged for k in ("acc/val/a", "acc/val/b"))


def test_a_nan_loss_raises_naming_the_step():
    def blows_up(model, batches, state: TrainState):
        loss = _ce(model, batches, state)
        return loss * float("nan") if state.step == 3 else loss

    with pytest.raises(MergebenchError, match="at step 3 "):
        _run(seed=0, config=TrainConfig(steps=5, batch_size=8), loss_fn=blows_up)


@pytest.mark.parametrize("bad", [
    {"steps": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"optimizer": "lbfgs"}, {"weight_decay": -0.1},
    {"momentum": 1.0}, {"schedule": "step"}, {"warmup_steps": 11, "steps": 10}, {"grad_clip": -1.0},
    {"batch_size": 0}, {"batch_size": 64, "shuffle_buffer": 32}, {"eval_every": -1}, {"eval_examples": 0},
    {"log_every": -1},
])
def test_train_config_validation(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        TrainConfig(**bad)


def test_train_config_from_a_plugins_params():
    @dataclasses.dataclass
    class Params:
        lr: float = 1e-4
        steps: int = 10
        alpha: float = 0.5  # the plugin's own

    config = TrainConfig.from_params(Params())
    assert (config.lr, config.steps, config.optimizer) == (1e-4, 10, "adam")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.from_params(Params(lr=-1.0))
