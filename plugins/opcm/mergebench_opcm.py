"""OPCM (Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model
Merging", 2025; FusionBench 0.2.33 `fusion_bench.method.opcm`): continual merging by orthogonal projection.

Experts arrive one at a time (`mergebench_core.contract.continual`). The merged task vector starts as the first
expert's. When expert t arrives, each Linear weight's task vector τ_t is projected away from the merged task vector's
most important singular directions, so what earlier experts wrote there is not overwritten: with the full SVD
τ̂ = U S Vᵀ, P = Uᵀ τ_t V has its diagonal zeroed and its leading r × r block zeroed, r being the first index where the
cumulative share of singular values Σ_{i≤r} s_i / Σ s exceeds `alpha`, and τ_t is replaced by U P Vᵀ. Other tensors
(biases, norms, embeddings) are added unprojected. The running sum S_t = S_{t−1} + projected τ_t is then rescaled to
the average norm of the task vectors seen so far: θ_t = θ_0 + S_t · mean_{i≤t} ‖τ_i‖ / ‖S_t‖ (norms over the whole
model). FusionBench keeps the same quantity as λ_t and a rescaled merged vector; the result is the same.

Default `alpha` = 0.5 (FusionBench's `config/method/opcm/opcm.yaml`). Reference deviations: a merged weight that is
exactly zero has no singular directions to protect, so τ_t is added whole (the reference divides by zero there); norms
leave out batch-norm running statistics and integer buffers, which the reference's state-dict norm includes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.contract.continual import ContinualMethod, TaskVector

log = logging.getLogger(__name__)


@dataclass
class Params:
    alpha: float = 0.5
    """Share of the merged weight's singular-value mass whose leading block is protected (FusionBench's default)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] (a share of the singular values' sum), got {self.alpha}")


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The first index whose cumulative share of `s` exceeds `alpha` (0 when none does, as argmax of all-false)."""
    share = s.cumsum(0) / s.sum()
    return int((share > alpha).to(torch.int64).argmax().item())


def project_out(merged: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ with its components on the merged matrix's diagonal singular pairs and its leading r × r block removed."""
    if not bool(merged.any()):
        return tau
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    p = u.T @ tau @ vh.T
    p.diagonal().zero_()
    r = split_rank(s, alpha)
    p[:r, :r] = 0
    return u @ p @ vh


class Opcm(ContinualMethod):
    """Add each arriving expert outside the merged model's main singular directions; keep the average norm."""

    name = "opcm"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def begin(self, keys: Any) -> None:
        self.norms: list[float] = []
        self.sum_scale = 1.0  # S_{t-1} = sum_scale · merged_{t-1} (FusionBench's λ_{t-1})
        self.lambdas: list[float] = [1.0]

    def first(self, tau: TaskVector) -> TaskVector:
        self.norms.append(_norm(tau))
        return super().first(tau)

    def absorb(self, step: int, key: str, merged: torch.Tensor, tau: torch.Tensor, is_matrix: bool) -> torch.Tensor:
        added = project_out(merged, tau, self.params.alpha) if is_matrix else tau
        return self.sum_scale * merged + added  # S_t, rescaled in `settle`

    def settle(self, step: int, merged: TaskVector, tau: TaskVector) -> TaskVector:
        self.norms.append(_norm(tau))
        average = sum(self.norms) / len(self.norms)
        total = _norm(merged)
        self.sum_scale = total / average
        self.lambdas.append(self.sum_scale)
        return {k: v * (average / total) for k, v in merged.items()}

    def extras(self) -> dict[str, Any]:
        return {"lambda_t": self.lambdas}


def _norm(tensors: TaskVector) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


@hookimpl
def register_methods(register):
    register(Opcm)
