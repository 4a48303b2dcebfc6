"""Task arithmetic: θ = θ_0 + λ Σ_t (θ_t − θ_0) (Ilharco et al., "Editing models with task arithmetic", ICLR 2023).

A preset of the core's task-vector pipeline (`mergebench_core.engine.presets`): no drop, trim or election.
λ = 0.3 is FusionBench's default for the CLIP eight-task benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod
from mergebench_core.engine.presets import task_arithmetic


@dataclass
class Params:
    scaling_factor: float = 0.3
    """λ, the weight of the summed task vectors."""


class TaskArithmetic(TaskVectorPipelineMethod):
    """Adds the scaled sum of task vectors to the pretrained model."""

    name = "task_arithmetic"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        return task_arithmetic(self.params.scaling_factor)


@hookimpl
def register_methods(register):
    register(TaskArithmetic)
