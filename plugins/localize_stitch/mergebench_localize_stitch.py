"""Localize-and-Stitch (He, Hu, Lin, Zhang & Zhao, "Localize-and-Stitch: Efficient Model Merging via Sparse Task
Arithmetic", TMLR 2025; the authors' code: github.com/yifei-he/Localize-and-Stitch).

Localize: each task keeps a sparse binary mask m_t over the model's parameters. Stitch: where several masks overlap,
their task vectors are averaged, θ = θ_0 + Σ_t (m_t / Σ_s m_s) ⊙ τ_t (0 where no mask is set).

- `localize_stitch_dataless`: m_t marks the top `sparsity` = 10 % of |τ_t| over the whole model (the authors'
  dataless script, `sparsity_level = 0.1`). Exactly ⌊0.1·n⌋ entries are kept by the core's exact top-k (ties to
  the earlier entry); the authors' code keeps the entries strictly above the k-th largest, one fewer.
- `localize_stitch`: m_t is learned on `n_shot` = 64 labeled training examples per class of task t. Mask logits S
  start at +`sigmoid_bias` on the top `sparsity` = 1e-5 of |τ_t| and −`sigmoid_bias` elsewhere (bias 5); each of
  `epochs` = 10 epochs takes one step from the gradient g of the mean cross-entropy (over the epoch's batches of
  `batch_size` = 128) at θ_0 + σ(S) ⊙ τ_t: S ← S − lr·(g ⊙ τ_t) ⊙ σ'(S) + `l1_strength`·sign(S)·σ'(S), with
  lr = 1e7 and l1_strength = 1 (the authors' vision script; the sign term is the one their code applies, which
  pushes each logit away from 0). The mask is round(σ(S)). The few-shot set is the first `n_shot` examples of each
  class in the task pool's order, and batches are drawn in a seeded shuffled order.
Only parameters are merged; buffers keep θ_0's values, as in the authors' code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mergebench_core import MergeOutput, Method, MethodInfo, ModelPool, RunContext, TaskPool, hookimpl
from mergebench_core.data.statistics import LogitsOf
from mergebench_core.engine.exact_topk import keep_count, topk_mask
from mergebench_core.engine.parameter_task_vectors import ParameterTaskVectors, flatten, unflatten
from mergebench_core.errors import MergebenchError
from mergebench_core.running.data_needs import require_task_pool

log = logging.getLogger(__name__)


@dataclass
class DatalessParams:
    sparsity: float = 0.1
    """Fraction of each task vector's entries (over the whole model) its mask keeps."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {self.sparsity}")


@dataclass
class Params(DatalessParams):
    sparsity: float = 1e-5
    """Fraction of |τ_t| (over the whole model) the mask logits start positive on."""
    sigmoid_bias: float = 5.0
    """|S| at the start: σ(±5) rounds to 1 / 0."""
    lr: float = 1e7
    """Step size on the mask logits."""
    l1_strength: float = 1.0
    epochs: int = 10
    """One step per epoch over the few-shot set."""
    n_shot: int = 64
    """Labeled training examples per class of each task."""
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 0 or self.n_shot < 1 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0, n_shot and batch_size >= 1")
        if not all(math.isfinite(x) for x in (self.sigmoid_bias, self.lr, self.l1_strength)):
            raise ValueError("sigmoid_bias, lr and l1_strength must be finite numbers")


def top_fraction_masks(taus: Mapping[str, torch.Tensor], keys: Sequence[str], fraction: float) -> list[torch.Tensor]:
    """Per task, the flat mask of its top ⌊fraction·n⌋ |τ_t| entries over the whole model."""
    n_tasks = len(next(iter(taus.values())))
    flats = [flatten({k: taus[k][t] for k in keys}, keys) for t in range(n_tasks)]
    return [topk_mask(f, keep_count(fraction, f.numel())) for f in flats]


def stitch(flat_taus: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Σ_t (m_t / Σ_s m_s) ⊙ τ_t over flat (T, n) task vectors and masks; 0 where no mask is set."""
    m = masks.to(flat_taus.dtype)
    count = m.sum(0)
    weights = torch.where(count > 0, m / count.clamp_min(1), torch.zeros_like(m))
    return (weights * flat_taus).sum(0)


def few_shot_set(taskpool: TaskPool, task: str, n_shot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_shot` training examples of each class, in the task pool's order."""
    xs, ys, seen = [], [], {}
    for inputs, labels in taskpool.batches(task, "train", batch_size=256):
        for x, y in zip(inputs, labels):
            c = int(y)
            if seen.get(c, 0) < n_shot:
                seen[c] = seen.get(c, 0) + 1
                xs.append(x)
                ys.append(y)
    if not xs:
        raise MergebenchError(f"task {task!r} of task pool {taskpool.name!r} has no training examples to learn a "
                              f"Localize-and-Stitch mask from")
    return torch.stack(xs), torch.stack(ys)


def learn_mask(wrapper: torch.nn.Module, base: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor],
               keys: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], params: Params
               ) -> torch.Tensor:
    """The flat binary mask learned for one task (see the module docstring)."""
    flat_tau = flatten(tau, keys)
    start = topk_mask(flat_tau, keep_count(params.sparsity, flat_tau.numel()))
    logits = torch.where(start, params.sigmoid_bias, -params.sigmoid_bias).to(flat_tau)
    names = [f"model.{k}" for k in keys]
    for _ in range(params.epochs):
        frac = torch.sigmoid(logits)
        theta = {n: (base[k].float() + d).requires_grad_(True)
                 for n, k, d in zip(names, keys, unflatten(frac * flat_tau, tau, keys).values())}
        total = torch.zeros_like(flat_tau)
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(functional_call(wrapper, theta, (x,)).float(), y)
            grads = torch.autograd.grad(loss, list(theta.values()))
            total += params.lr * torch.cat([g.reshape(-1) for g in grads]) * flat_tau
        total /= max(len(batches), 1)
        derivative = frac * (1 - frac)
        logits = logits - total * derivative + params.l1_strength * torch.where(logits > 0, derivative, -derivative)
    return torch.round(torch.sigmoid(logits)).bool()


class _LocalizeStitch(Method):
    def masks(self, pool: ModelPool, ctx: RunContext, tv: ParameterTaskVectors) -> list[torch.Tensor]:
        raise NotImplementedError

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tv = ParameterTaskVectors.of(self, pool)
        masks = torch.stack(self.masks(pool, ctx, tv))
        flat_taus = torch.stack([flatten(tv.task(i), tv.keys) for i in range(len(tv.experts))])
        update = unflatten(stitch(flat_taus, masks), tv.base, tv.keys)
        proportions = {e: float(m.float().mean()) for e, m in zip(tv.experts, masks)}
        log.info("%s: mask proportions %s", self.name, proportions)
        return MergeOutput(tv.apply(update), extras={"mask_proportion": proportions})


class DatalessLocalizeStitch(_LocalizeStitch):
    """Masks of each task vector's largest entries, stitched with overlaps averaged."""

    name = "localize_stitch_dataless"
    Params = DatalessParams
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def masks(self, pool, ctx, tv):
        return top_fraction_masks(tv.taus, tv.keys, self.params.sparsity)


class LocalizeStitch(_LocalizeStitch):
    """Masks learned on a few labeled examples per class, stitched with overlaps averaged."""

    name = "localize_stitch"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True, stochastic=True)  # the seeded batch order

    def masks(self, pool, ctx, tv):
        taskpool, p = require_task_pool(self, ctx.taskpool), self.params
        model = tv.model.to(ctx.device).eval()
        base = {k: v.to(ctx.device) for k, v in tv.base.items()}
        out = []
        for i, expert in enumerate(ctx.track(tv.experts, desc=f"{self.name} masks")):
            task = pool.task_of(expert)
            xs, ys = few_shot_set(taskpool, task, p.n_shot)
            order = torch.randperm(len(xs), generator=ctx.generator(offset=i))
            batches = [(xs[order[j:j + p.batch_size]].to(ctx.device), ys[order[j:j + p.batch_size]].to(ctx.device))
                       for j in range(0, len(xs), p.batch_size)]
            tau = {k: v.to(ctx.device) for k, v in tv.task(i).items()}
            out.append(learn_mask(LogitsOf(model, taskpool, task), base, tau, tv.keys, batches, p).cpu())
        tv.model.cpu()
        return out


@hookimpl
def register_methods(register):
    register(LocalizeStitch)
    register(DatalessLocalizeStitch)
