"""Linear scalarization: fine-tune one model from θ_0 on every task at once, minimising Σ_t r_t L_t.

r is the cell's preference (uniform without one, which is plain multi-task learning: the "multi-task training"
reference of the merging literature). Each step draws one batch per task; the heads stay frozen, as in the pool.
A linear scalarization reaches only the convex part of a Pareto front; Chebyshev and EPO (their own plugins) reach
the rest. Its parameters are the training fields of `TrainingParams`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.training.loop import Batch, TrainState, task_losses
from mergebench_core.training.methods import TrainingMethod
from mergebench_core.training.params import TrainingParams

Params = TrainingParams  # its parameters are the training fields alone (the name, for importers)


class LinearScalarization(TrainingMethod):
    """Multi-task fine-tuning on Σ_t r_t L_t for the cell's preference r (uniform: multi-task learning)."""

    name = "linear_scalarization"
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, preference_aware=True)

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState
             ) -> tuple[torch.Tensor, dict[str, float]]:
        losses = task_losses(model, batches, state)
        weights = dict(zip(state.tasks, state.task_weights().tolist()))
        total = sum(weights[t] * loss for t, loss in losses.items())  # in task order, as Python adds: same bits
        return total, {f"loss/train/{t}": float(loss.detach()) for t, loss in losses.items()}  # type: ignore


@hookimpl
def register_methods(register):
    register(LinearScalarization)
