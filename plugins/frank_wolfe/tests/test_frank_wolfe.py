"""Frank-Wolfe merging: the closed form of repeated steps toward one checkpoint, the oracle on hand-made gradients,
parity with FusionBench 0.2.33's FrankWolfeHardAlgorithm on a toy pool with the same examples, and a digits run."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from mergebench_frank_wolfe import FrankWolfeHard, HardParams, frank_wolfe_hard, select
from torch import nn


def test_steps_toward_one_checkpoint_have_a_closed_form():
    # A gradient that always points away from expert "a" makes the oracle pick it every step; after K steps
    # θ_K = a + Π_k (1 − γ_k λ) (θ_0 − a), γ_k = 2/(k+2)·step.
    start = {"w": torch.tensor([1.0, -1.0])}
    experts = {"a": {"w": torch.tensor([-2.0, 3.0])}, "b": {"w": torch.tensor([5.0, -4.0])}}

    def gradient(theta, tasks):
        return {"w": -experts["a"]["w"]}

    p = HardParams(max_iters=4, step_size=0.5, scaling_factor=0.3)
    theta, chosen = frank_wolfe_hard(start, experts, gradient, ["t"], p)
    assert chosen == ["a"] * 4
    shrink = 1.0
    for k in range(4):
        shrink *= 1 - 2 / (k + 2) * 0.5 * 0.3
    torch.testing.assert_close(theta["w"], experts["a"]["w"] + shrink * (start["w"] - experts["a"]["w"]))


def test_the_oracle_by_task_and_by_layer():
    grads = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0])}
    cands = {"a": {"x": torch.tensor([-1.0, 0.0]), "y": torch.tensor([0.0, 1.0])},   # cos -1 and +1: sum 0
             "b": {"x": torch.tensor([0.0, 1.0]), "y": torch.tensor([-1.0, -1.0])}}  # cos 0 and -0.707: sum -0.707
    state, name = select(grads, cands, "task")
    assert name == "b" and state is not cands["b"] and torch.equal(state["x"], cands["b"]["x"])
    state, names = select(grads, cands, "layer")
    assert names == {"x": "a", "y": "b"}
    assert select(grads, cands, "task", exclude=["b"])[1] == "a"


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.lin = nn.Linear(5, 3)


def toy():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    experts = {}
    for name in ("t0", "t1", "t2"):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
        experts[name] = m
    heads = {t: nn.Linear(5, 3) for t in experts}
    data = {t: [(torch.randn(4), torch.randint(0, 3, ())) for _ in range(40)] for t in experts}
    return base, experts, heads, data


def test_hard_parity_with_fusion_bench(monkeypatch):
    fw = pytest.importorskip("fusion_bench.method.fw_merging.fw_hard")
    from fusion_bench import BaseModelPool

    base, experts, heads, data = toy()
    size, iters = 6, 3

    class Pool(BaseModelPool):  # load_model hands out copies, as loading from disk does
        def load_model(self, name, *args, **kwargs):
            return copy.deepcopy(super().load_model(name, *args, **kwargs))

    class Algo(fw.FrankWolfeHardAlgorithm):
        is_debug_mode = False

        def on_frank_wolfe_iteration_start(self):
            self.streams = {t: itertools.cycle(data[t]) for t in experts}

        def log_hyperparams(self, *args, **kwargs):
            pass

        def get_shuffled_loader_iter(self, task):
            return self

        def __next__(self):
            x, y = next(self.streams[self.current])
            return x[None], y[None]

        def compute_logits(self, module, images, task):
            return heads[task](module(images))

    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)  # FusionBench moves models to the GPU
    # 0.2.33's state-dict arithmetic checks types strictly and raises TypeError when a Parameter meets a plain tensor,
    # which its own task arithmetic does at once (the model's Parameters plus the summed task vector); the arithmetic
    # itself is what is compared here
    import functools
    monkeypatch.setattr(fw, "state_dict_sub", functools.partial(fw.state_dict_sub, strict=False))
    monkeypatch.setattr(fw, "state_dict_add", functools.partial(fw.state_dict_add, strict=False))

    def iter_hook(original):  # remember the task FusionBench asks for, so __next__ serves its stream
        def get(self, task):
            self.current = task
            return self
        return get
    monkeypatch.setattr(Algo, "get_shuffled_loader_iter", iter_hook(None))

    algo = Algo(merge_fn="task_arithmetic", step_size=0.1, max_iters=iters, dataset_size=size,
                scaling_factor=0.3, granularity="task", loss_fn="cross_entropy")
    try:
        theirs = algo.run(Pool({"_pretrained_": copy.deepcopy(base), **copy.deepcopy(experts)})).state_dict()
    finally:
        torch.set_grad_enabled(True)  # FusionBench leaves gradients switched off globally

    streams = {t: itertools.cycle(data[t]) for t in experts}

    def gradient(theta, tasks):
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        for t in tasks:
            rows = [next(streams[t]) for _ in range(size)]
            x, y = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
            logits = heads[t](torch.func.functional_call(base, params, (x,)))
            loss = nn.functional.cross_entropy(logits, y) / len(tasks)
            for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[k] += g
        return total

    b = base.state_dict()
    start = {k: b[k] + 0.3 * sum(e.state_dict()[k] - b[k] for e in experts.values()) for k in b}
    ours, _ = frank_wolfe_hard(start, {n: e.state_dict() for n, e in experts.items()}, gradient,
                                    list(experts), HardParams(max_iters=iters, dataset_size=size))
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_params_are_validated():
    with pytest.raises(ValueError, match="granularity"):
        HardParams(granularity="model")


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_hard_runs_on_the_digits_pool(granularity, digits_pools):
    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = FrankWolfeHard(HardParams(max_iters=2, dataset_size=20, granularity=granularity)).run(
        pool, RunContext(taskpool=taskpool))
    assert len(out.extras["chosen"]) == 2
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.5


class _Fabric:
    """What FusionBench's AdaMerging loop asks of Lightning Fabric, on one CPU process."""

    is_global_zero = True

    def setup(self, module, optimizer):
        return module, optimizer

    def backward(self, loss):
        loss.backward()

    def log_dict(self, *args, **kwargs):
        pass


def test_soft_parity_with_fusion_bench(monkeypatch):
    fw = pytest.importorskip("fusion_bench.method.fw_merging.fw_soft")
    from fusion_bench import BaseModelPool
    from mergebench_frank_wolfe import SoftParams, entropy, frank_wolfe_soft

    base, experts, heads, data = toy()
    test = {t: [torch.randn(16, 4) for _ in range(5)] for t in experts}
    size, iters, ada = 5, 2, 15

    class Pool(BaseModelPool):
        def load_model(self, name, *args, **kwargs):
            return copy.deepcopy(super().load_model(name, *args, **kwargs))

    class Algo(fw.FrankWolfeSoftAlgorithm):
        is_debug_mode = False
        fabric = _Fabric()

        def on_frank_wolfe_iteration_start(self):
            self.train_streams = {t: itertools.cycle(data[t]) for t in experts}
            self.test_streams = {t: itertools.cycle(test[t]) for t in experts}

        def log_hyperparams(self, *args, **kwargs):
            pass

        def get_shuffled_train_loader_iter(self, task, batch_size=1):
            return (tuple(v[None] for v in next(self.train_streams[task])) for _ in itertools.count())

        def get_shuffled_test_loader_iter(self, task, batch_size=16):
            return ((next(self.test_streams[task]),) for _ in itertools.count())

        def compute_logits(self, module, images, task):
            return heads[task](module(images))

    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    algo = Algo(max_iters=iters, dataset_size=size, ada_iters=ada, ada_coeff=1e-8, merge_fn="adamerging")
    try:
        theirs = algo.run(Pool({"_pretrained_": copy.deepcopy(base), **copy.deepcopy(experts)})).state_dict()
    finally:
        torch.set_grad_enabled(True)  # FusionBench leaves gradients switched off globally

    train = {t: itertools.cycle(data[t]) for t in experts}
    tests = {t: itertools.cycle(test[t]) for t in experts}

    def gradient(theta, tasks):
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        (t,) = tasks
        rows = [next(train[t]) for _ in range(size)]
        x, y = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        loss = nn.functional.cross_entropy(heads[t](torch.func.functional_call(base, params, (x,))), y)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    def objective(theta):
        return sum(entropy(heads[t](torch.func.functional_call(base, theta, (next(tests[t]),)))) for t in experts)

    ours, history = frank_wolfe_soft(base.state_dict(), {n: e.state_dict() for n, e in experts.items()}, gradient,
                                     list(experts), objective, SoftParams(max_iters=iters, dataset_size=size,
                                                                          ada_iters=ada))
    assert all(sorted(h) == sorted(experts) for h in history)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-5)


def test_soft_without_steps_is_task_arithmetic_at_the_initial_coefficient():
    # 0 AdaMerging steps: the first iteration gives θ_0 + 0.3 Σ_t τ_t whatever the selection order
    start = {"w": torch.tensor([1.0, 2.0])}
    experts = {"a": {"w": torch.tensor([2.0, 2.0])}, "b": {"w": torch.tensor([1.0, 5.0])}}
    from mergebench_frank_wolfe import SoftParams, frank_wolfe_soft

    theta, history = frank_wolfe_soft(start, experts, lambda th, ts: {"w": torch.tensor([1.0, -1.0])}, ["a", "b"],
                                      lambda th: th["w"].sum(), SoftParams(max_iters=1, ada_iters=0))
    assert history == [["b", "a"]]  # b is least aligned with the gradient, then a (b excluded)
    torch.testing.assert_close(theta["w"], torch.tensor([1.3, 2.9]))


def test_soft_runs_on_the_digits_pool(digits_pools):
    from mergebench_frank_wolfe import FrankWolfeSoft, SoftParams

    from mergebench_core import RunContext
    from mergebench_core.data.evaluation import evaluate

    pool, taskpool = digits_pools
    out = FrankWolfeSoft(SoftParams(max_iters=2, dataset_size=10, ada_iters=5)).run(pool, RunContext(taskpool=taskpool))
    assert [sorted(h) for h in out.extras["chosen"]] == [sorted(pool.expert_names)] * 2
    acc = evaluate(taskpool, out.model, limit=200)
    assert sum(m["accuracy"] for m in acc.values()) / len(acc) > 0.5
