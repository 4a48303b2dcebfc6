"""The data statistics on transformers' `Conv1D`, GPT-2's linear layer, which stores its weight transposed (in, out):
its input Gram matrices, RegMean's and RegMean++'s joint least-squares solution in that layout, and the Fisher."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mergebench_core import PRETRAINED, ModelPool, RunContext, TaskPool
from mergebench_core.data.statistics import fisher_diagonal, in_features, linear_input_grams, linear_layers, weight_is_transposed

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D

D, N = 6, 40  # square layers: a weight read in the wrong layout would still fit, and give a wrong answer


class VectorTasks(TaskPool):
    """Three tasks with differently scaled and shifted inputs; targets from a different map per task."""

    name = "vector-tasks"

    def __init__(self, d_in: int = D, d_out: int = D, classes: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.x = {t: torch.randn(N, d_in, generator=g) * torch.rand(d_in, generator=g) * 3
                  + torch.randn(d_in, generator=g) for t in self.tasks}
        truth = {t: torch.randn(d_in, d_out, generator=g) for t in self.tasks}
        self.y = {t: self.x[t] @ truth[t] + 0.1 * torch.randn(N, d_out, generator=g) for t in self.tasks}
        self.labels = {t: torch.randint(0, classes or d_out, (N,), generator=g) for t in self.tasks}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b", "c"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x[task][:limit], self.labels[task][:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


class Conv1DLeastSquaresPool(ModelPool):
    """Each expert is a GPT-2 `Conv1D` whose weight (in, out) is the least-squares fit to its own task's data."""

    name = "conv1d-least-squares"

    def __init__(self, tasks: VectorTasks):
        self.weights = {t: torch.linalg.lstsq(tasks.x[t], tasks.y[t]).solution for t in tasks.tasks}
        self.weights[PRETRAINED] = torch.zeros(D, D)

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b", "c"]

    def load_model(self, name: str) -> nn.Module:
        layer = Conv1D(D, D)
        layer.weight.data.copy_(self.weights[name])
        layer.bias.data.zero_()
        return layer.eval()


def test_conv1d_is_a_linear_layer_stored_transposed():
    model = nn.Sequential(Conv1D(5, 3), nn.Linear(5, 2))
    layers = linear_layers(model)
    assert list(layers) == ["0", "1"]
    assert weight_is_transposed(layers["0"]) and not weight_is_transposed(layers["1"])
    assert in_features(layers["0"]) == 3 and in_features(layers["1"]) == 5


def test_gram_of_a_conv1d_input_is_xtx_over_rows():
    tasks = VectorTasks()
    grams = linear_input_grams(Conv1D(4, D), tasks, "b", n_examples=N, batch_size=16)
    x = tasks.x["b"]
    torch.testing.assert_close(grams[""], x.T @ x / N, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["regmean", "regmean_pp"])
def test_regmean_on_conv1d_recovers_the_joint_least_squares_solution(method, tmp_path):
    from mergebench_regmean import Params, RegMean
    from mergebench_regmean_pp import RegMeanPlusPlus

    tasks = VectorTasks()
    pool = Conv1DLeastSquaresPool(tasks)
    cls = RegMean if method == "regmean" else RegMeanPlusPlus
    out = cls(Params(n_examples=N, reduce_non_diagonal_ratio=1.0, batch_size=16)).run(
        pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    x = torch.cat([tasks.x[t] for t in tasks.tasks]).double()
    y = torch.cat([tasks.x[t] @ pool.weights[t] for t in tasks.tasks]).double()
    joint = torch.linalg.lstsq(x, y).solution.float()  # (in, out): Conv1D's own layout
    assert isinstance(out.model, Conv1D)
    torch.testing.assert_close(out.model.weight.data, joint, rtol=1e-4, atol=1e-4)
    wrong_layout = torch.linalg.lstsq(x, torch.cat([tasks.x[t] @ pool.weights[t].T for t in tasks.tasks]).double())
    assert (wrong_layout.solution.T.float() - joint).abs().max() > 0.1  # the test can tell the layouts apart


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_fisher_on_conv1d_layers_is_the_mean_squared_per_example_gradient(per_example):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, D), nn.Tanh(), Conv1D(3, 8)).eval()
    tasks = VectorTasks(classes=3)
    fisher = fisher_diagonal(model, tasks, "a", n_examples=12, batch_size=5, per_example=per_example)
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for x, y in zip(tasks.x["a"][:12], tasks.labels["a"][:12]):
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        for (k, _), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            expected[k] += g.pow(2) / 12
    assert fisher["0.weight"].shape == (D, 8)  # the Conv1D's (in, out) layout
    for k, value in expected.items():
        torch.testing.assert_close(fisher[k], value, rtol=1e-4, atol=1e-7)
    assert all(fisher[k].abs().sum() > 0 for k in expected)
