"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024): for every
entry, keep the task-vector value of largest magnitude across tasks, θ = θ_0 + λ·τ_max.

Defaults and conventions, from the authors' release (github.com/danielm1405/magmax):
- λ = `scaling_factor` = 0.5, the coefficient its eight-dataset script (`merge_8datasets.py`) uses for MagMax, and
  FusionBench's default. (λ = 1 would apply the selected entries at full strength; 0.5 is what was evaluated.)
- Ties in magnitude go to the later expert in pool order (the release folds the task vectors in order and replaces
  the running choice when |τ_t| ≥ |current|), so equal magnitudes of opposite sign take the later one's sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, TaskVectorMethod, hookimpl
from mergebench_core.engine.pipeline import max_magnitude


@dataclass
class Params:
    scaling_factor: float = 0.5
    """λ applied to the selected maximum-magnitude task vector."""


class MagMax(TaskVectorMethod):
    """Adds the entry-wise largest-magnitude task vector to the pretrained model."""

    name = "magmax"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    blockwise = True  # element-wise: large tensors stream in blocks

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return base.to(torch.float32) + self.params.scaling_factor * max_magnitude(taus)


@hookimpl
def register_methods(register):
    register(MagMax)
