"""Frank-Wolfe merging (Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization", 2025,
arXiv:2503.12649), as FusionBench 0.2.33 implements it (`fusion_bench/method/fw_merging`).

Both variants treat merging as minimising the tasks' cross-entropy over the convex hull of the models, with
Frank-Wolfe steps: at the current merge θ, the gradient g of L(θ) = (1/T) Σ_t mean CE_t over `dataset_size`
labeled training examples per task; the linear minimisation oracle picks the checkpoint c that minimises the sum over
parameter tensors p of cos(g_p, c_p) ("task" granularity), or per tensor the checkpoint whose tensor minimises it
("layer" granularity). The cosine is taken with the checkpoint's weights, not its task vector, as FusionBench does.

- `frank_wolfe_hard`: θ starts at task arithmetic θ_0 + λ Σ_t τ_t; the candidates are the experts and that starting
  point; step k moves θ ← θ + γ_k·λ·(c − θ) with γ_k = 2/(k + 2)·`step_size`.
- `frank_wolfe_soft`: θ starts at θ_0; each iteration selects, task by task (the gradient of that task's loss alone),
  a distinct expert, then learns layer-wise AdaMerging coefficients for the selected experts around θ (task
  vectors c − θ, coefficients started at 0.3 in the first iteration and at `ada_coeff` after, not clamped), Adam
  lr 1e-3, `ada_iters` steps on the summed prediction entropy of 16 shuffled test inputs per task.
  When every expert is selected (FusionBench's default: one per task), the selection only orders them.

Defaults (FusionBench's `method/fw_merging/fw_hard.yaml` and `fw_soft.yaml`): 10 iterations, `step_size` 0.1,
`dataset_size` 100, granularity "task"; hard: `scaling_factor` λ 0.3 with task arithmetic; soft: `ada_iters` 500,
`ada_coeff` 1e-8. FusionBench draws the examples one at a time from a shuffled loader that continues across
iterations; here each task's training split is one seeded shuffled stream that continues across iterations too.
Gradients are taken with the model in eval mode (FusionBench sets train mode, which differs only for dropout and
batch norm). Only parameters are merged: buffers keep the starting point's values.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mergebench_core import MergebenchError, MergeOutput, Method, MethodInfo, ModelPool, RunContext, TaskPool, hookimpl
from mergebench_core.data.batches import shuffled_batches
from mergebench_core.data.statistics import LogitsOf
from mergebench_core.engine.parameter_task_vectors import ParameterTaskVectors
from mergebench_core.running.data_needs import require_task_pool

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
Gradient = Callable[[State, Sequence[str]], State]
"""(θ, tasks) -> ∇ of the mean over `tasks` of each task's mean cross-entropy at θ, per parameter."""


@dataclass
class HardParams:
    max_iters: int = 10
    step_size: float = 0.1
    """γ_k = 2/(k + 2)·step_size."""
    dataset_size: int = 100
    """Labeled training examples per task behind each gradient."""
    scaling_factor: float = 0.3
    """λ of the starting task arithmetic, and the factor of every step."""
    granularity: str = "task"
    """"task" (one checkpoint per step) or "layer" (one per parameter tensor)."""

    def __post_init__(self) -> None:
        if self.max_iters < 0 or self.dataset_size < 1:
            raise ValueError("max_iters must be >= 0 and dataset_size >= 1")
        if not (math.isfinite(self.step_size) and math.isfinite(self.scaling_factor)):
            raise ValueError("step_size and scaling_factor must be finite numbers")
        if self.granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {self.granularity!r}")


def cosine(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """FusionBench's alignment: ⟨g, c⟩ / (‖g‖‖c‖), NaN when either is zero (a NaN never wins a comparison)."""
    g, c = g.flatten().float(), c.flatten().float()
    return torch.dot(g, c) / (g.norm() * c.norm())


def select(grads: State, candidates: Mapping[str, State], granularity: str,
           exclude: Sequence[str] | Mapping[str, Sequence[str]] = ()) -> tuple[State, str | dict[str, str]]:
    """The linear minimisation oracle: the candidate (or per tensor the candidate's tensor) least aligned with the
    gradient; among equal scores the earlier candidate; candidates named in `exclude` (per tensor: a mapping) are
    skipped."""
    if granularity == "task":
        best, best_name = math.inf, None
        for name, state in candidates.items():
            score = sum(float(cosine(grads[k], state[k])) for k in grads)
            if score < best and name not in exclude:
                best, best_name = score, name
        if best_name is None:
            raise MergebenchError("frank_wolfe: no checkpoint has a defined alignment with the loss gradient (a zero "
                                  "gradient or zero weights make every cosine NaN); check the task pool's heads and "
                                  "labels, or raise dataset_size")
        return dict(candidates[best_name]), best_name
    chosen: State = {}
    names: dict[str, str] = {}
    for k in grads:
        best = math.inf
        for name, state in candidates.items():
            score = float(cosine(grads[k], state[k]))
            skipped = exclude.get(k, ()) if isinstance(exclude, Mapping) else exclude
            if score < best and name not in skipped:
                best, chosen[k], names[k] = score, state[k], name
    return chosen, names


def frank_wolfe_hard(start: State, experts: Mapping[str, State], gradient: Gradient, tasks: Sequence[str],
                     params: HardParams) -> tuple[State, list]:
    """Hard Frank-Wolfe merging from `start` (task arithmetic), over the experts and `start` as candidates."""
    theta = {k: v.clone() for k, v in start.items()}
    candidates = {**experts, "initial": start}
    chosen = []
    for step in range(params.max_iters):
        grads = gradient(theta, tasks)
        target, name = select(grads, candidates, params.granularity)
        gamma = 2 / (step + 2) * params.step_size * params.scaling_factor
        theta = {k: theta[k] + gamma * (target[k] - theta[k]) if k in target else theta[k] for k in theta}
        chosen.append(name)
    return theta, chosen


@dataclass
class SoftParams:
    max_iters: int = 10
    dataset_size: int = 100
    """Labeled training examples per task behind each task's gradient."""
    ada_iters: int = 500
    """AdaMerging (Adam) steps per iteration."""
    ada_coeff: float = 1e-8
    """Starting coefficient of AdaMerging after the first iteration (which starts at `init`)."""
    init: float = 0.3
    ada_lr: float = 1e-3
    ada_batch_size: int = 16
    """Unlabeled test inputs per task per AdaMerging step."""
    granularity: str = "task"

    def __post_init__(self) -> None:
        if self.max_iters < 0 or self.dataset_size < 1 or self.ada_iters < 0 or self.ada_batch_size < 1:
            raise ValueError("max_iters and ada_iters must be >= 0, dataset_size and ada_batch_size >= 1")
        if not all(math.isfinite(x) for x in (self.ada_coeff, self.init, self.ada_lr)):
            raise ValueError("ada_coeff, init and ada_lr must be finite numbers")
        if self.granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {self.granularity!r}")


def entropy(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean prediction entropy −Σ p log(p + ε), FusionBench's `entropy_loss`."""
    probs = torch.softmax(logits.float(), dim=-1)
    return -(probs * torch.log(probs + eps)).sum(-1).mean()


def ada_merge(theta: State, selected: Sequence[State], objective: Callable[[State], torch.Tensor], init: float,
              steps: int, lr: float) -> State:
    """Layer-wise AdaMerging around θ: θ + Σ_i w_i,p (c_i,p − θ_p), w started at `init`, unclamped, minimising
    `objective` with Adam."""
    keys = list(theta)
    taus = {k: torch.stack([c[k].float() - theta[k] for c in selected]) for k in keys}
    weights = torch.nn.Parameter(torch.full((len(selected), len(keys)), float(init)))
    optimizer = torch.optim.Adam([weights], lr=lr)

    def merged() -> State:
        return {k: theta[k] + torch.einsum("t,t...->...", weights[:, i], taus[k]) for i, k in enumerate(keys)}

    with torch.enable_grad():
        for _ in range(steps):
            loss = objective(merged())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return merged()


def frank_wolfe_soft(base: State, experts: Mapping[str, State], gradient: Gradient, tasks: Sequence[str],
                     objective: Callable[[State], torch.Tensor], params: SoftParams) -> tuple[State, list]:
    """Soft Frank-Wolfe merging from θ_0: per iteration one distinct expert per task by the oracle, then AdaMerging
    of the selected experts around the current merge."""
    theta = {k: v.float().clone() for k, v in base.items()}
    history = []
    for step in range(params.max_iters):
        names: list | dict[str, list[str]] = [] if params.granularity == "task" else {k: [] for k in theta}
        selected = []
        for task in tasks:
            target, name = select(gradient(theta, [task]), experts, params.granularity, names)
            if isinstance(names, list):
                names.append(name)
            else:
                for k, n in name.items():
                    names[k].append(n)
            selected.append(target)
            if len(selected) >= len(experts):
                break
        theta = ada_merge(theta, selected, objective, params.init if step == 0 else params.ada_coeff,
                          params.ada_iters, params.ada_lr)
        history.append(names)
    return theta, history


class TaskGradients:
    """`Gradient` over a task pool: each task's training split is one seeded shuffled stream, continued across
    calls, from which every call takes the next `dataset_size` examples."""

    def __init__(self, model: torch.nn.Module, taskpool: TaskPool, tasks: Sequence[str], dataset_size: int,
                 ctx: RunContext):
        self.model, self.size, self.device = model.to(ctx.device).eval(), dataset_size, ctx.device
        self.wrappers = {t: LogitsOf(self.model, taskpool, t) for t in tasks}
        self.streams = {t: self._examples(taskpool, t, ctx.generator(offset=i)) for i, t in enumerate(tasks)}

    @staticmethod
    def _examples(taskpool: TaskPool, task: str, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in shuffled_batches(taskpool, task, "train", batch_size=1, generator=gen):
            yield x[0], y[0]

    def batch(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = list(itertools.islice(self.streams[task], self.size))
        return torch.stack([x for x, _ in rows]).to(self.device), torch.stack([y for _, y in rows]).to(self.device)

    @torch.enable_grad()
    def __call__(self, theta: State, tasks: Sequence[str]) -> State:
        params = {f"model.{k}": v.to(self.device).requires_grad_(True) for k, v in theta.items()}
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for task in tasks:
            x, y = self.batch(task)
            loss = torch.nn.functional.cross_entropy(functional_call(self.wrappers[task], params, (x,)).float(), y)
            for k, g in zip(params, torch.autograd.grad(loss / len(tasks), list(params.values()))):
                total[k] += g
        return {k.removeprefix("model."): v.detach().cpu() for k, v in total.items()}


class FrankWolfeHard(Method):
    """Frank-Wolfe steps from task arithmetic toward the checkpoint least aligned with the loss gradient."""

    name = "frank_wolfe_hard"
    Params = HardParams
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True, stochastic=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        p, taskpool = self.params, require_task_pool(self, ctx.taskpool)
        tv = ParameterTaskVectors.of(self, pool)
        experts = {e: {k: tv.base[k].float() + tv.taus[k][i] for k in tv.keys} for i, e in enumerate(tv.experts)}
        start = {k: tv.base[k].float() + p.scaling_factor * tv.taus[k].sum(0) for k in tv.keys}
        tasks = list(dict.fromkeys(pool.task_of(e) for e in tv.experts))
        gradient = TaskGradients(tv.model, taskpool, tasks, p.dataset_size, ctx)
        theta, chosen = frank_wolfe_hard(start, experts, gradient, tasks, p)
        model = tv.apply({k: theta[k] - tv.base[k].float() for k in tv.keys})
        return MergeOutput(model.cpu(), extras={"chosen": chosen})


class TestEntropy:
    """The AdaMerging objective: Σ_t entropy on the next `batch_size` shuffled test inputs of task t (one seeded
    stream per task, continued across steps and iterations)."""

    def __init__(self, gradients: TaskGradients, taskpool: TaskPool, tasks: Sequence[str], batch_size: int,
                 ctx: RunContext):
        self.wrappers, self.device = gradients.wrappers, ctx.device
        self.streams = {t: shuffled_batches(taskpool, t, "test", batch_size=batch_size,
                                            generator=ctx.generator(offset=len(tasks) + i))
                        for i, t in enumerate(tasks)}

    def __call__(self, theta: State) -> torch.Tensor:
        params = {f"model.{k}": v.to(self.device) for k, v in theta.items()}
        return sum(entropy(functional_call(self.wrappers[t], params, (next(s)[0].to(self.device),)))
                   for t, s in self.streams.items())


class FrankWolfeSoft(Method):
    """Frank-Wolfe selection of experts, each iteration followed by layer-wise AdaMerging around the merge."""

    name = "frank_wolfe_soft"
    Params = SoftParams
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True, stochastic=True,
                      left_out_of_sweeps="trains 10 × 500 AdaMerging steps (about 5 minutes on the embedded pool)")

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        p, taskpool = self.params, require_task_pool(self, ctx.taskpool)
        tv = ParameterTaskVectors.of(self, pool)
        experts = {e: {k: tv.base[k].float() + tv.taus[k][i] for k in tv.keys} for i, e in enumerate(tv.experts)}
        tasks = list(dict.fromkeys(pool.task_of(e) for e in tv.experts))
        gradient = TaskGradients(tv.model, taskpool, tasks, p.dataset_size, ctx)
        objective = TestEntropy(gradient, taskpool, tasks, p.ada_batch_size, ctx)
        theta, history = frank_wolfe_soft({k: tv.base[k] for k in tv.keys}, experts, gradient, tasks, objective, p)
        model = tv.apply({k: theta[k].cpu() - tv.base[k].float() for k in tv.keys})
        chosen = history if p.granularity == "task" else [  # per iteration: how many tensors each expert gave
            {e: sum(names.count(e) for names in h.values()) for e in experts} for h in history]
        return MergeOutput(model.cpu(), extras={"chosen": chosen})


@hookimpl
def register_methods(register):
    register(FrankWolfeHard)
    register(FrankWolfeSoft)
