"""Chebyshev (Tchebycheff) scalarization: fine-tune one model from θ_0 on every task at once, minimising
max_t r_t (L_t − z_t).

r is the cell's preference (uniform without one) and z the reference point, here z = 0 (the losses are
non-negative, so 0 is a lower bound of each). Where the preference ray meets the Pareto front, the minimiser is that
point, r_1 L_1 = ... = r_m L_m, concave parts of the front included, which a weighted sum (`linear_scalarization`)
cannot reach; in general it is weakly Pareto optimal. Each step the gradient flows through the task of largest
r_t L_t only.

`smooth = μ > 0` uses the smooth Tchebycheff scalarization μ · log Σ_t exp(r_t (L_t − z_t) / μ) (Lin et al., "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024): every task gets a gradient, weighted by a
softmax of r_t L_t / μ; it overestimates the max by at most μ log m, and its minimiser leaves the ray by O(μ).

`reference = "experts"` takes z_t = the loss of task t's expert on the first `reference_examples` train examples of
task t (scored once, before the first step): the experts are the ideal point a multi-task model tries to approach,
and max_t r_t (L_t − z_t) then measures how far each task is behind its expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.training.loop import Batch, TrainState, task_losses
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.params import TrainingParams

REFERENCES = ("zero", "experts")


@dataclass
class Params(TrainingParams):
    reference: str = "zero"
    """The reference point z: "zero" (z_t = 0) or "experts" (z_t = task t's expert's train loss)."""
    reference_examples: int = 512
    """With reference="experts": how many train examples of each task score its expert."""
    smooth: float = 0.0
    """μ: 0 for the plain max; μ > 0 for the smooth Tchebycheff μ · log Σ_t exp(r_t (L_t − z_t) / μ)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.reference_examples < 1:
            raise ValueError(f"reference_examples must be at least 1, got {self.reference_examples}")
        if not (math.isfinite(self.smooth) and self.smooth >= 0):
            raise ValueError(f"smooth must be a finite number >= 0 (0: the plain max), got {self.smooth}")


def chebyshev_scalarization(losses: Tensor, preference: Tensor | Sequence[float], reference: Tensor | None = None,
                            smooth: float = 0.0) -> Tensor:
    """max_t r_t (L_t − z_t), or μ · log Σ_t exp(r_t (L_t − z_t) / μ) for smooth = μ > 0, from a vector of losses
    (m), a preference (m, non-negative) and a reference point z (m; None: 0)."""
    r = torch.as_tensor(preference, dtype=losses.dtype, device=losses.device)
    if r.shape != losses.shape:
        raise ValueError(f"the preference has shape {tuple(r.shape)} and the losses {tuple(losses.shape)}")
    shifted = losses if reference is None else losses - reference.to(losses)
    weighted = r * shifted
    if smooth > 0:
        return smooth * torch.logsumexp(weighted / smooth, dim=0)
    return weighted.max()


class Chebyshev(TrainingMethod):
    """Multi-task fine-tuning on max_t r_t L_t (or its smooth version) for the cell's preference r."""

    name = "chebyshev"
    Params = Params
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, preference_aware=True)

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> tuple[Tensor, dict[str, float]]:
        losses = task_losses(model, batches, state)
        tasks = list(losses)
        weights = dict(zip(state.tasks, state.task_weights().tolist()))
        stacked = torch.stack([losses[t] for t in tasks])
        z = None
        if self.params.reference == "experts":
            if "chebyshev_z" not in state.extras:
                state.extras["chebyshev_z"] = self.expert_losses(state, tasks)
                state.report["reference"] = dict(zip(tasks, state.extras["chebyshev_z"].tolist()))
            z = state.extras["chebyshev_z"]
        total = chebyshev_scalarization(stacked, [weights[t] for t in tasks], z, smooth=self.params.smooth)
        return total, {f"loss/train/{t}": float(loss.detach()) for t, loss in losses.items()}

    def expert_losses(self, state: TrainState, tasks: Sequence[str]) -> Tensor:
        """z_t: the mean cross-entropy of task t's expert on its first `reference_examples` train examples."""
        pool = state.modelpool
        if pool is None:
            raise ValueError("chebyshev.reference=experts scores each task's expert, and the training state has no "
                             "model pool: train through TrainingMethod.obtain or pass modelpool to train()")
        expert_of = {pool.task_of(e): e for e in pool.expert_names}
        z = []
        for task in tasks:
            if task not in expert_of:
                raise ValueError(f"chebyshev.reference=experts: pool {pool.name!r} has no expert for task {task!r}")
            expert = pool.load_model(expert_of[task]).to(state.device).eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for x, y in state.taskpool.batches(task, "train", limit=self.params.reference_examples):
                    x, y = x.to(state.device), y.to(state.device)
                    logits = state.taskpool.logits(expert, task, x).float()
                    total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                    count += len(y)
            z.append(total / count)
        return torch.tensor(z, device=state.device)


@hookimpl
def register_methods(register):
    register(Chebyshev)
