"""RegMean++: equal to RegMean on one layer, the hand-computed merged-activation Grams on two, and the embedded pool."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mergebench_core import PRETRAINED, ModelPool, RunContext, TaskPool
from mergebench_core.data.evaluation import evaluate
from mergebench_regmean import Params as RegMeanParams
from mergebench_regmean import RegMean
from mergebench_regmean_pp import Params, RegMeanPlusPlus

D, N = 5, 40


class Tasks(TaskPool):
    name = "chain-tasks"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = {t: torch.randn(N, D, generator=g) * (1 + i) + i for i, t in enumerate(self.tasks)}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = self.x[task][:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


class ChainPool(ModelPool):
    name = "chain"

    def __init__(self, layers: int):
        self.layers = layers
        g = torch.Generator().manual_seed(1)
        self.models = {n: self._make([torch.randn(D, D, generator=g) for _ in range(layers)])
                       for n in (PRETRAINED, "a", "b")}

    @staticmethod
    def _make(weights: list[torch.Tensor]) -> nn.Module:
        seq = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in weights])
        for layer, w in zip(seq, weights):
            layer.weight.data.copy_(w)
        return seq.eval()

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b"]

    def load_model(self, name: str) -> nn.Module:
        import copy
        return copy.deepcopy(self.models[name])


def _solve(grams, weights):
    lhs = sum(g.double() for g in grams)
    rhs = sum(g.double() @ w.double().T for g, w in zip(grams, weights))
    return torch.linalg.solve(lhs, rhs).T.float()


def test_one_layer_equals_regmean(tmp_path):
    tasks, pool = Tasks(), ChainPool(1)
    ctx = RunContext(taskpool=tasks, cache_dir=tmp_path)
    pp = RegMeanPlusPlus(Params(n_examples=N, reduce_non_diagonal_ratio=1.0)).run(pool, ctx).model
    rm = RegMean(RegMeanParams(n_examples=N, reduce_non_diagonal_ratio=1.0)).run(pool, ctx).model
    torch.testing.assert_close(pp[0].weight, rm[0].weight)


def test_second_layer_uses_the_merged_first_layer(tmp_path):
    tasks, pool = Tasks(), ChainPool(2)
    out = RegMeanPlusPlus(Params(n_examples=N, reduce_non_diagonal_ratio=1.0)).run(
        pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    assert out.extras["regressed_in_order"] == ["0.weight", "1.weight"]
    xs = [tasks.x[t] for t in tasks.tasks]
    w0 = _solve([x.T @ x / N for x in xs], [pool.models[t][0].weight.data for t in tasks.tasks])
    hs = [x @ w0.T for x in xs]  # the merged first layer's outputs, not each expert's
    w1 = _solve([h.T @ h / N for h in hs], [pool.models[t][1].weight.data for t in tasks.tasks])
    torch.testing.assert_close(out.model[0].weight.data, w0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.model[1].weight.data, w1, rtol=1e-4, atol=1e-5)
    # plain RegMean's second layer differs: it sees each expert's own first-layer outputs
    rm = RegMean(RegMeanParams(n_examples=N, reduce_non_diagonal_ratio=1.0)).run(
        pool, RunContext(taskpool=tasks, cache_dir=tmp_path)).model
    assert not torch.allclose(rm[1].weight, out.model[1].weight, atol=1e-3)


def test_runs_on_the_embedded_pool(digits_pools, tmp_path):
    pool, taskpool = digits_pools
    out = RegMeanPlusPlus(Params(n_examples=64)).run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    assert out.extras["regressed_in_order"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    accs = [v["accuracy"] for v in evaluate(taskpool, out.model).values()]
    pre = [v["accuracy"] for v in evaluate(taskpool, pool.load_model(PRETRAINED)).values()]
    assert sum(accs) / len(accs) > sum(pre) / len(pre)


def test_convolutions_are_merged_in_forward_order_like_linear_layers(tmp_path):
    # A 1×1 conv followed by a 3×3 conv: the first layer sees the data itself, so it equals RegMean's; both
    # kernels are regressed (neither is the plain average).
    class Images(Tasks):
        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.x = {t: torch.randn(10, 2, 5, 5, generator=g) * (1 + i) + i for i, t in enumerate(self.tasks)}

        def logits(self, model, task, inputs):
            return model(inputs).flatten(1)

    class ConvPool(ModelPool):
        name = "convs"

        def __init__(self):
            g = torch.Generator().manual_seed(4)
            self.states = {}
            for n in (PRETRAINED, "a", "b"):
                model = self._make()
                for p in model.parameters():
                    p.data.copy_(torch.randn(p.shape, generator=g))
                self.states[n] = model.state_dict()

        @staticmethod
        def _make():
            return nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1, bias=False))

        @property
        def expert_names(self):
            return ["a", "b"]

        def load_model(self, name):
            model = self._make()
            model.load_state_dict(self.states[name])
            return model.eval()

    pool, tasks = ConvPool(), Images()
    pp = RegMeanPlusPlus(Params(n_examples=10)).run(pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    plain = RegMean(RegMeanParams(n_examples=10)).run(pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    assert pp.extras["regressed_in_order"] == ["0.weight", "2.weight"]
    torch.testing.assert_close(pp.model[0].weight.data, plain.model[0].weight.data, rtol=1e-5, atol=1e-6)
    for key in ("0.weight", "2.weight"):
        mean = (pool.states["a"][key] + pool.states["b"][key]) / 2
        assert (pp.model.state_dict()[key] - mean).abs().max() > 0.01
    assert not torch.allclose(pp.model[2].weight.data, plain.model[2].weight.data)  # merged-model inputs differ
