"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024): for every
entry, keep the task-vector value of largest magnitude across tasks, θ = θ_0 + λ·τ_max. A preset of the core's
task-vector pipeline (`mergebench_core.engine.presets.magmax`: combine "max", no election).

From the authors' release (github.com/danielm1405/magmax): λ = `scaling_factor` = 0.5, the coefficient of its
eight-dataset script (`merge_8datasets.py`) and FusionBench's default; ties in magnitude go to the later expert in
pool order (the release replaces the running choice when |τ_t| ≥ |current|), so equal magnitudes of opposite sign
take the later one's sign.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod
from mergebench_core.engine.presets import magmax


@dataclass
class Params:
    scaling_factor: float = 0.5
    """λ applied to the selected maximum-magnitude task vector."""


class MagMax(TaskVectorPipelineMethod):
    """Adds the entry-wise largest-magnitude task vector to the pretrained model."""

    name = "magmax"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        return magmax(self.params.scaling_factor)


@hookimpl
def register_methods(register):
    register(MagMax)
