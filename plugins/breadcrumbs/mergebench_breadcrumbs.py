"""Model Breadcrumbs (Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", 2023): drop the outliers *and* the smallest entries of each task vector, then add the rest.

For each task vector and each tensor of n entries, ⌊γ·n⌋ entries of largest magnitude are removed (outliers that
tend to conflict between tasks), then enough of the smallest are removed that ⌊density·n⌋ entries remain; if
γ + density > 1, fewer outliers are removed so that `density` is still met (MergeKit's convention). The masked
vectors are merged by task arithmetic: θ = θ_0 + λ Σ_t m_t ⊙ τ_t.

Defaults: γ = `gamma` = 0.01 and `density` = 0.9 (MergeKit's `breadcrumbs` gamma default and its documented example;
MergeKit's bare `density` default is 1.0, which keeps everything and so turns the method off). λ = 0.3, the task
arithmetic default of this benchmark (FusionBench's TA setting); the paper tunes λ on validation data. Counts are
exact (`mergebench_core.sparsify`): ties in magnitude go to the earlier entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, TensorMergeMethod, hookimpl
from mergebench_core.sparsify import bottomk_mask, keep_count, topk_mask


@dataclass
class Params:
    density: float = 0.9
    """Fraction of each tensor's task-vector entries that is kept."""
    gamma: float = 0.01
    """Fraction of each tensor's task-vector entries removed from the top (largest magnitudes)."""
    scaling_factor: float = 0.3
    """λ applied to the summed masked task vectors."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must be a fraction in [0, 1], got {self.density}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be a fraction in [0, 1], got {self.gamma}")


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep-mask of one task-vector tensor: not among the ⌊γ·n⌋ largest, nor among the smallest beyond density."""
    n = tau.numel()
    keep = keep_count(density, n)
    n_top = min(keep_count(gamma, n), n - keep)
    n_bottom = n - keep - n_top
    return ~(topk_mask(tau, n_top) | bottomk_mask(tau, n_bottom))


class Breadcrumbs(TensorMergeMethod):
    """Task arithmetic on task vectors with their largest and smallest entries masked out, per tensor."""

    name = "breadcrumbs"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        masks = torch.stack([breadcrumbs_mask(t, self.params.density, self.params.gamma) for t in taus])
        return base.to(torch.float32) + self.params.scaling_factor * (taus * masks).sum(0)


@hookimpl
def register_methods(register):
    register(Breadcrumbs)
