"""RegMean: exact recovery of the joint least-squares solution, the α = 0 limit, exclusions, and the embedded pool."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mergebench_core import PRETRAINED, ModelPool, RunContext, TaskPool
from mergebench_core.data.evaluation import evaluate
from mergebench_regmean import Params, RegMean, regmean_merge

D_IN, D_OUT, N = 6, 3, 50


class LinearTasks(TaskPool):
    """Three regression-style tasks with different input distributions; 'logits' are the linear outputs."""

    name = "linear-tasks"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = {t: torch.randn(N, D_IN, generator=g) * torch.rand(D_IN, generator=g) * 3 + torch.randn(D_IN, generator=g)
                  for t in self.tasks}
        truth = {t: torch.randn(D_OUT, D_IN, generator=g) for t in self.tasks}
        self.y = {t: self.x[t] @ truth[t].T + 0.1 * torch.randn(N, D_OUT, generator=g) for t in self.tasks}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b", "c"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = self.x[task][:limit]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


class LeastSquaresPool(ModelPool):
    """Each expert is the least-squares fit of a bias-free Linear layer to its own task's data."""

    name = "least-squares"

    def __init__(self, tasks: LinearTasks):
        self.weights = {t: torch.linalg.lstsq(tasks.x[t], tasks.y[t]).solution.T for t in tasks.tasks}
        self.weights[PRETRAINED] = torch.zeros(D_OUT, D_IN)

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b", "c"]

    def load_model(self, name: str) -> nn.Module:
        layer = nn.Linear(D_IN, D_OUT, bias=False)
        layer.weight.data.copy_(self.weights[name])
        return layer.eval()


def test_recovers_the_joint_least_squares_solution(tmp_path):
    tasks = LinearTasks()
    pool = LeastSquaresPool(tasks)
    out = RegMean(Params(n_examples=N, reduce_non_diagonal_ratio=1.0, batch_size=16)).run(
        pool, RunContext(taskpool=tasks, cache_dir=tmp_path))
    x = torch.cat([tasks.x[t] for t in tasks.tasks])
    y = torch.cat([tasks.y[t] for t in tasks.tasks])
    joint = torch.linalg.lstsq(x.double(), y.double()).solution.T.float()
    torch.testing.assert_close(out.model.weight.data, joint, rtol=1e-4, atol=1e-4)
    # and it is not merely close to the average of the experts
    mean = torch.stack([pool.weights[t] for t in tasks.tasks]).mean(0)
    assert (mean - joint).abs().max() > 0.1


def test_alpha_zero_is_a_diagonal_weighted_average():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(D_OUT, D_IN, generator=g) for _ in range(3)]
    grams = []
    for _ in range(3):
        x = torch.randn(20, D_IN, generator=g) * torch.rand(D_IN, generator=g)
        grams.append({"lin": x.T @ x / 20})
    merged, regressed = regmean_merge([{"lin.weight": w} for w in ws], grams, ratio=0.0)
    diag = torch.stack([torch.diagonal(gr["lin"]) for gr in grams])  # (3, in)
    want = (diag[:, None, :] * torch.stack(ws)).sum(0) / diag.sum(0)
    torch.testing.assert_close(merged["lin.weight"], want, rtol=1e-5, atol=1e-6)
    assert regressed == ["lin.weight"]


def test_non_linear_tensors_are_averaged_and_exclusions_kept():
    states = [{"lin.weight": torch.eye(2) * (i + 1), "lin.bias": torch.tensor([float(i), 0.0]),
               "norm.weight": torch.tensor([1.0 + i]), "frozen.weight": torch.tensor([5.0 + i])} for i in range(2)]
    grams = [{"lin": torch.eye(2)}, {"lin": torch.eye(2)}]
    keep = {"frozen.weight": torch.tensor([-1.0])}
    merged, _ = regmean_merge(states, grams, 0.95, exclude=[r"frozen\."], keep=keep)
    torch.testing.assert_close(merged["lin.weight"], torch.eye(2) * 1.5)  # equal Grams: the average
    torch.testing.assert_close(merged["lin.bias"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(merged["norm.weight"], torch.tensor([1.5]))
    torch.testing.assert_close(merged["frozen.weight"], torch.tensor([-1.0]))


def test_beats_task_arithmetic_on_the_embedded_pool(digits_pools, tmp_path):
    pool, taskpool = digits_pools

    def mean_acc(model):
        m = evaluate(taskpool, model)
        return sum(v["accuracy"] for v in m.values()) / len(m)

    out = RegMean().run(pool, RunContext(taskpool=taskpool, cache_dir=tmp_path))
    base = pool.state_dict(PRETRAINED)
    ta = {k: v + 0.3 * sum(pool.state_dict(e)[k] - v for e in pool.expert_names) for k, v in base.items()}
    ta_model = pool.load_model(PRETRAINED)
    ta_model.load_state_dict(ta)
    assert mean_acc(out.model) > mean_acc(ta_model)


# -- convolutions -------------------------------------------------------------------------------------------------

C, H, W = 3, 5, 6


class ImageTasks(TaskPool):
    """Two tasks of images (N, C, H, W) with different channel statistics; `per_position` hands each out as
    (N, H, W, C) instead, the same data read as one vector per position (for the equivalent Linear layer)."""

    name = "image-tasks"

    def __init__(self, per_position: bool = False):
        g = torch.Generator().manual_seed(2)
        self.per_position = per_position
        self.x = {t: torch.randn(12, C, H, W, generator=g) * (torch.rand(C, 1, 1, generator=g) * 2 + 0.2) + i
                  for i, t in enumerate(self.tasks)}

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = self.x[task][:limit]
        if self.per_position:
            x = x.permute(0, 2, 3, 1)
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).flatten(1)


class LayerPool(ModelPool):
    """A base and two experts of one layer built by `make`, with the given weights."""

    name = "layers"

    def __init__(self, make, weights: dict[str, torch.Tensor]):
        self.make, self.weights = make, weights

    @property
    def expert_names(self) -> list[str]:
        return ["a", "b"]

    def load_model(self, name: str) -> nn.Module:
        layer = self.make()
        layer.weight.data.copy_(self.weights[name].reshape(layer.weight.shape))
        return layer.eval()


def _conv_weights(out: int, kernel: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(out, C, kernel, kernel, generator=g) for n in (PRETRAINED, "a", "b")}


def test_a_1x1_convolution_is_merged_as_the_linear_layer_applied_at_every_position(tmp_path):
    weights = _conv_weights(4, 1, 3)
    params = Params(n_examples=12, reduce_non_diagonal_ratio=0.9, batch_size=5)
    conv = RegMean(params).run(LayerPool(lambda: nn.Conv2d(C, 4, 1, bias=False), weights),
                               RunContext(taskpool=ImageTasks(), cache_dir=tmp_path / "conv"))
    linear = RegMean(params).run(LayerPool(lambda: nn.Linear(C, 4, bias=False), weights),
                                 RunContext(taskpool=ImageTasks(per_position=True), cache_dir=tmp_path / "lin"))
    assert conv.extras["regressed"] == ["weight"] and "fallback_tensors" not in conv.extras
    torch.testing.assert_close(conv.model.weight.data.reshape(4, C), linear.model.weight.data, rtol=1e-5, atol=1e-6)
    mean = (weights["a"] + weights["b"]).reshape(4, C) / 2
    assert (linear.model.weight.data - mean).abs().max() > 0.05  # a regression, not the average


def _patches_by_hand(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """Every k×k patch of zero-padded x as a row (channel, row, column order), position by position."""
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = []
    for n in range(x.shape[0]):
        for i in range(0, xp.shape[2] - k + 1, stride):
            for j in range(0, xp.shape[3] - k + 1, stride):
                rows.append(xp[n, :, i:i + k, j:j + k].reshape(-1))
    return torch.stack(rows)


def test_a_kxk_convolution_is_the_least_squares_fit_to_the_experts_outputs(tmp_path):
    # With α = 1 RegMean is argmin_W Σ_t ‖P_t Wᵀ − Y_t‖² / n_t, P_t the task's unfolded patches and Y_t = P_t W_tᵀ
    # the expert's own outputs: solved here by lstsq on patches cut out by hand and outputs from F.conv2d.
    k, stride, pad = 3, 2, 1
    weights = _conv_weights(4, k, 4)
    tasks = ImageTasks()
    out = RegMean(Params(n_examples=12, reduce_non_diagonal_ratio=1.0, batch_size=5)).run(
        LayerPool(lambda: nn.Conv2d(C, 4, k, stride=stride, padding=pad, bias=False), weights),
        RunContext(taskpool=tasks, cache_dir=tmp_path))
    a, b = [], []
    for t in tasks.tasks:
        p = _patches_by_hand(tasks.x[t], k, stride, pad).double()
        y = torch.nn.functional.conv2d(tasks.x[t].double(), weights[t].double(), stride=stride, padding=pad)
        y = y.permute(0, 2, 3, 1).reshape(-1, 4)  # the same position order as the patches
        a.append(p / len(p) ** 0.5)
        b.append(y / len(p) ** 0.5)
    want = torch.linalg.lstsq(torch.cat(a), torch.cat(b)).solution.T.reshape(4, C, k, k).float()
    torch.testing.assert_close(out.model.weight.data, want, rtol=1e-4, atol=1e-4)


def test_a_grouped_convolution_is_averaged_with_a_warning_and_a_count(tmp_path, caplog):
    import logging

    g = torch.Generator().manual_seed(5)
    weights = {n: torch.randn(6, 1, 3, 3, generator=g) for n in (PRETRAINED, "a", "b")}
    with caplog.at_level(logging.WARNING):
        out = RegMean(Params(n_examples=12)).run(
            LayerPool(lambda: nn.Conv2d(C, 6, 3, groups=C, bias=False), weights),
            RunContext(taskpool=ImageTasks(), cache_dir=tmp_path))
    assert out.extras["fallback_tensors"] == {"mean": 1} and out.extras["regressed"] == []
    assert any("grouped convolution" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out.model.weight.data, (weights["a"] + weights["b"]) / 2)
