"""Linear scalarization: fine-tune one model from θ_0 on every task at once, minimising Σ_t r_t L_t.

r is the cell's preference (uniform without one, which is plain multi-task learning: the "multi-task training"
reference of the merging literature). Each step draws one batch per task; the heads stay frozen, as in the pool.
A linear scalarization reaches only the convex part of a Pareto front; Chebyshev and EPO (their own plugins) reach
the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.loop import Batch, TrainState, task_losses


@dataclass
class Params:
    steps: int = 200
    lr: float = 3e-4
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0


class LinearScalarization(TrainingMethod):
    """Multi-task fine-tuning on Σ_t r_t L_t for the cell's preference r (uniform: multi-task learning)."""

    name = "linear_scalarization"
    Params = Params
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, preference_aware=True)

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = task_losses(model, batches, state)
        weights = state.extras.get("preference") or {t: 1.0 / len(losses) for t in losses}
        total = sum(weights[t] * loss for t, loss in losses.items())
        return total, {f"loss/train/{t}": float(loss.detach()) for t, loss in losses.items()}  # type: ignore


@hookimpl
def register_methods(register):
    register(LinearScalarization)
