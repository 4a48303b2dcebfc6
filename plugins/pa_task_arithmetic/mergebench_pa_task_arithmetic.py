"""Preference-aware task arithmetic: θ = θ_0 + λ Σ_t w_t τ_t with w_t = T · r_t.

r is the cell's preference over its T tasks (normalised to sum 1), so the uniform preference gives w_t = 1 and
plain task arithmetic exactly; a vertex of the simplex gives θ_0 + λ·T·τ_t, the one task's vector alone at the
strength the whole sum would have. Without a preference the method is task arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MergeOutput, MethodInfo, ModelPool, RunContext, TensorMergeMethod, hookimpl


@dataclass
class Params:
    scaling_factor: float = 0.3
    """λ, as in task arithmetic."""


class PreferenceTaskArithmetic(TensorMergeMethod):
    """Task arithmetic with each expert's task vector weighted by the preference for its task."""

    name = "pa_task_arithmetic"
    Params = Params
    info = MethodInfo(kind="merge", data="none", preference_aware=True)

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.weights: torch.Tensor | None = None

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        prefs = ctx.task_weights()
        tasks = [pool.task_of(e) for e in pool.expert_names]
        if prefs:
            self.weights = torch.tensor([len(prefs) * prefs[t] for t in tasks], dtype=torch.float32)
        output = super().run(pool, ctx)
        if self.weights is not None:
            output.extras["task_weights"] = dict(zip(tasks, self.weights.tolist()))
        return output

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return base.to(torch.float32) + self.params.scaling_factor * taus.sum(0)
        weighted = taus * self.weights.view(-1, *([1] * (taus.dim() - 1)))
        return base.to(torch.float32) + self.params.scaling_factor * weighted.sum(0)


@hookimpl
def register_methods(register):
    register(PreferenceTaskArithmetic)
