"""Plain fine-tuning of every expert: the reference recipe for derived pools.

`digits-mlp_TA8+finetune(lr=1e-4)` names the embedded pool with each expert re-fine-tuned from the pretrained model
on its own task's train split by cross-entropy through the task pool's frozen head, under these parameters (the
training fields of `TrainingParams`). Every merge method then runs on it unchanged, so the effect of a fine-tuning
recipe on merging can be measured; recipes with regularisers (mergeability) are training methods of the same shape
with a different loss.
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


class Finetune(TrainingMethod):
    """Re-fine-tunes each expert from the pretrained model on its task (cross-entropy), making a derived pool."""

    name = "finetune"
    info = MethodInfo(kind="training", data="labeled", task_vectors=True, task_specific=True)
    """Run as a cell, it scores each re-trained expert on its own task: one model per task."""
    produces = "pool"

    def loss(self, model: nn.Module, batches: Mapping[str, Batch], state: TrainState) -> torch.Tensor:
        return sum(task_losses(model, batches, state).values())  # type: ignore[return-value]


@hookimpl
def register_methods(register):
    register(Finetune)
