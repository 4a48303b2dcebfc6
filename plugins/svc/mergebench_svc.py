"""SVC, singular value calibration ("When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging",
arXiv 2602.05536), as FusionBench 0.2.33 implements it (`fusion_bench.method.singular_value_calibration`).

Merging sums what several tasks share: along a direction that many task vectors update, the merged update is
larger than any task's own. SVC measures that per singular direction of the merged update and scales it back.
For each 2-D parameter (biases and norms stay as the base merged them), with ΔW_m = W_merged − W_0 = U Σ Vᵀ and
task updates ΔW_t = W_t − W_0:
- the responses along direction r: a_r = u_rᵀ ΔW_m and a_r^t = u_rᵀ ΔW_t;
- the projection coefficient s_r^t = ⟨a_r, a_r^t⟩ / max(‖a_r^t‖², 1e-12) (> 1: the merge over-counts task t there);
- the calibration γ_r = T / Σ_t max(α, s_r^t), and W = W_0 + U diag(γ Σ) Vᵀ.
Computed in float64, as FusionBench's default (accelerated) implementation does; a NaN coefficient counts as α.

It composes with any method that merges one model: `base` is a method spec (`mergebench_core.contract.composition`),
`svc.base=ties` or `svc.base=ties(k=0.1,scaling_factor=0.5)`; the stored parameters spell out every parameter of
the base. Defaults: `base` task_arithmetic (λ 0.3) and α = 0.1, FusionBench's config
`method/singular_value_calibration/task_arithmetic.yaml` (its TIES, TSV-M, Iso-C and DARE configs also use 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergebench_core import PRETRAINED, MergeOutput, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.contract.composition import OnBaseMethod, canonical_spec, with_base_extras
from mergebench_core.engine.pool_sources import pool_source


@dataclass
class Params:
    base: str = "task_arithmetic"
    """The method whose merged model is calibrated (a method spec: `ties`, `ties(k=0.1)`)."""
    alpha: float = 0.1
    """The floor of each projection coefficient: larger values calibrate more strongly."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")
        self.base = canonical_spec(self.base, owner="svc.base")


def calibrate(base: torch.Tensor, tasks: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """The calibrated merged weight, from the pretrained weight (m, n), the experts' (T, m, n) and the merged one."""
    w0 = base.to(torch.float64)
    deltas = tasks.to(torch.float64) - w0
    delta = merged.to(torch.float64) - w0
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    merged_resp = u.T @ delta  # (R, n)
    task_resp = torch.einsum("mr,tmn->rtn", u, deltas)  # (R, T, n)
    norms = (task_resp * task_resp).sum(-1).clamp_min(1e-12)
    coeff = torch.einsum("rn,rtn->rt", merged_resp, task_resp) / norms
    coeff = torch.nan_to_num(coeff, nan=alpha, neginf=alpha, posinf=math.inf)
    gamma = len(tasks) / torch.clamp(coeff, min=alpha).sum(1)
    return (w0 + (u * (gamma * s)) @ vh).to(merged.dtype)


class Svc(OnBaseMethod):
    """Scale back the singular directions of a merged update that the merge over-counted."""

    name = "svc"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        spec, base_output = self.run_base(pool, ctx)
        model = base_output.model
        base = pool_source(pool, PRETRAINED)
        experts = [pool_source(pool, name) for name in pool.expert_names]
        calibrated = 0
        with torch.no_grad():
            for name, param in ctx.track(list(model.named_parameters()), desc="calibrating (svc)"):
                if param.dim() != 2:
                    continue
                tasks = torch.stack([e.get(name).to(torch.float64) for e in experts])
                param.copy_(calibrate(base.get(name), tasks, param.detach().cpu(), self.params.alpha))
                calibrated += 1
        return with_base_extras(MergeOutput(model, {"calibrated_tensors": calibrated}), base_output, spec)


@hookimpl
def register_methods(register):
    register(Svc)
