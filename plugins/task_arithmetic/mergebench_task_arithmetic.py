"""Task arithmetic: θ = θ_0 + λ Σ_t (θ_t − θ_0) (Ilharco et al., "Editing models with task arithmetic", ICLR 2023).

λ = 0.3 is FusionBench's default for the CLIP eight-task benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, TaskVectorMethod, hookimpl


@dataclass
class Params:
    scaling_factor: float = 0.3
    """λ, the weight of the summed task vectors."""


class TaskArithmetic(TaskVectorMethod):
    """Adds the scaled sum of task vectors to the pretrained model."""

    name = "task_arithmetic"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    blockwise = True  # element-wise: large tensors stream in blocks

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return base.to(torch.float32) + self.params.scaling_factor * taus.sum(0)


@hookimpl
def register_methods(register):
    register(TaskArithmetic)
