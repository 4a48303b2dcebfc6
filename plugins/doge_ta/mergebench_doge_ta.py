"""DOGE task arithmetic (Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent",
ICML 2025, arXiv:2501.01230), as FusionBench 0.2.33 implements it (`fusion_bench/method/doge_ta`). Data-free.

For every 2-D weight (FusionBench's CLIP filter keeps the encoder's linear weights, not its norms or biases):
- adaptive λ: λ_t = `lamda` / ‖τ_t‖ per task and per tensor (so every task contributes an update of norm `lamda`;
  0 for a task that left the tensor unchanged, where FusionBench divides by zero);
- a shared correction δ (one per tensor, started at 0) minimises Σ_t Σ_rows ⟨τ_t, τ_t − Σ_i λ_i τ_i − (Σ_i λ_i) δ⟩²
  row by row: each task's own direction should survive in the merge. Adam, lr 1e-4, 400 steps per tensor;
- every gradient of δ is projected out of the shared subspace before the step: the top ⌊r/T⌋ left singular vectors
  of each τ_t (r = min(rows, cols)) are placed side by side, and the top ⌊r/`subspace`⌋ left singular vectors U of
  that matrix give g ← g − U Uᵀ g (δ moves only where it does not disturb what the tasks share);
- each corrected τ_t + δ is masked to τ_t's largest entries, the top `K` = 30 % by magnitude over all such weights
  of the model; FusionBench keeps the entries at least as large as the (n − ⌊K·n⌋)-th smallest, which is
  ⌊K·n⌋ + 1 entries when magnitudes are distinct: here the core's exact top-k of that many;
- θ = θ_0 + Σ_t λ_t (τ_t + δ) ⊙ mask_t.
Every other tensor (biases, norms, embeddings, buffers) keeps θ_0's value, as in FusionBench.

Defaults (FusionBench's `method/doge_ta/doge_ta.yaml`): `subspace` 6, `K` 30 (a percentage; values ≤ 1 are read as
fractions, as FusionBench does), `lamda` 0.07; `lr` 1e-4 and `steps` 400 are fixed in FusionBench's code and are
parameters here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergebench_core import MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.engine.exact_topk import keep_count, topk_mask
from mergebench_core.engine.parameter_task_vectors import ParameterTaskVectors, flatten, unflatten

log = logging.getLogger(__name__)


@dataclass
class Params:
    subspace: int = 6
    """The shared subspace keeps ⌊r/subspace⌋ directions of each tensor (r = min(rows, cols))."""
    K: float = 30.0
    """Percentage of each task vector's entries kept (≤ 1: a fraction)."""
    lamda: float = 0.07
    """Norm of every task's scaled update per tensor: λ_t = lamda / ‖τ_t‖."""
    lr: float = 1e-4
    steps: int = 400
    """Adam steps on δ per tensor."""

    def __post_init__(self) -> None:
        if self.subspace < 1 or self.steps < 0:
            raise ValueError("subspace must be >= 1 and steps >= 0")
        if not 0.0 <= self.K <= 100.0:
            raise ValueError(f"K must be a percentage in [0, 100] (or a fraction), got {self.K}")
        if not (math.isfinite(self.lamda) and math.isfinite(self.lr)):
            raise ValueError("lamda and lr must be finite numbers")

    @property
    def fraction(self) -> float:
        return self.K / 100 if self.K > 1 else self.K


def shared_projection(taus: torch.Tensor, subspace: int) -> torch.Tensor:
    """U Uᵀ (rows × rows) over the top ⌊r/subspace⌋ left singular vectors of [U_1[:, :r/T] … U_T[:, :r/T]]."""
    n_tasks, m, n = taus.shape
    r = min(m, n)
    per_task = r // n_tasks
    stacked = torch.zeros(m, r, dtype=taus.dtype)
    for i in range(n_tasks):
        u = torch.linalg.svd(taus[i], full_matrices=False)[0]
        stacked[:, i * per_task:(i + 1) * per_task] = u[:, :per_task]
    u = torch.linalg.svd(stacked, full_matrices=False)[0][:, :r // subspace]
    return u @ u.T


def interference_loss(taus: torch.Tensor, delta: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Σ_t Σ_rows ⟨τ_t, τ_t − Σ_i λ_i τ_i − (Σ_i λ_i) δ⟩² over taus (T, m, n)."""
    merged = (taus * lambdas.view(-1, 1, 1)).sum(0) + lambdas.sum() * delta
    return ((taus * (taus - merged)).sum(-1) ** 2).sum()


def optimise_delta(taus: torch.Tensor, lambdas: torch.Tensor, projection: torch.Tensor, lr: float, steps: int
                   ) -> torch.Tensor:
    """δ after `steps` Adam steps on `interference_loss`, each gradient projected out of the shared subspace."""
    delta = torch.zeros_like(taus[0], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            interference_loss(taus, delta, lambdas).backward()
            delta.grad -= projection @ delta.grad
            optimizer.step()
    return delta.detach()


def doge_update(taus: Mapping[str, torch.Tensor], keys: Sequence[str], params: Params) -> dict[str, torch.Tensor]:
    """Σ_t λ_t (τ_t + δ) ⊙ mask_t for each key in `keys` (2-D tensors; taus stacked (T, m, n))."""
    norms = {k: taus[k].flatten(1).norm(dim=1) for k in keys}  # a task that left a tensor unchanged gets λ = 0
    lambdas = {k: torch.where(n > 0, params.lamda / n.clamp_min(1e-30), torch.zeros_like(n)) for k, n in norms.items()}
    deltas = {k: optimise_delta(taus[k], lambdas[k], shared_projection(taus[k], params.subspace), params.lr,
                                params.steps) for k in keys}
    n_tasks = len(taus[keys[0]])
    order = sorted(keys)  # FusionBench flattens the state dict in sorted key order; the mask does not depend on it
    update = {k: torch.zeros_like(taus[k][0]) for k in keys}
    for t in range(n_tasks):
        flat = flatten({k: taus[k][t] for k in keys}, order)
        mask = unflatten(topk_mask(flat, min(flat.numel(), keep_count(params.fraction, flat.numel()) + 1)),
                         deltas, order)
        for k in keys:
            update[k] += lambdas[k][t] * (taus[k][t] + deltas[k]) * mask[k]
    return update


class DogeTA(Method):
    """Task arithmetic with norm-adaptive λ and a shared correction learned by projected gradient descent."""

    name = "doge_ta"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tv = ParameterTaskVectors.of(self, pool)
        keys = [k for k in tv.keys if tv.taus[k].dim() == 3]
        update = doge_update(tv.taus, keys, self.params) if keys else {}
        log.info("doge_ta: %d of %d parameter tensors merged (the 2-D weights)", len(keys), len(tv.keys))
        return MergeOutput(tv.apply(update), extras={"merged_tensors": len(keys)})


@hookimpl
def register_methods(register):
    register(DogeTA)
