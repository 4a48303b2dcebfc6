"""Model Breadcrumbs (Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", 2023): drop the outliers *and* the smallest entries of each task vector, then add the rest.

For each task vector and each tensor of n entries, ⌊γ·n⌋ entries of largest magnitude are removed (outliers that
tend to conflict between tasks), then enough of the smallest are removed that ⌊density·n⌋ entries remain; if
γ + density > 1, fewer outliers are removed so that `density` is still met (MergeKit's convention). The masked
vectors are merged by task arithmetic: θ = θ_0 + λ Σ_t m_t ⊙ τ_t.

Defaults: γ = `gamma` = 0.01 and `density` = 0.9 (MergeKit's `breadcrumbs` gamma default and its documented example;
MergeKit's bare `density` default is 1.0, which keeps everything and so turns the method off). λ = 0.3, the task
arithmetic default of this benchmark (FusionBench's TA setting); the paper tunes λ on validation data. Counts are
exact: entries are ranked by magnitude, the earlier entry first among equals (`mergebench_core.engine.sparsify`), and the
ranks ⌊γ'·n⌋ + 1 … ⌊γ'·n⌋ + ⌊density·n⌋ are kept (γ' the reduced γ). This is the core pipeline's trim with
`skip_top` (`mergebench_core.engine.pipeline`), streamed in blocks like every pipeline method.

`breadcrumbs_ties` (MergeKit 0.1.5's name) adds TIES's sign election to the same trim: the masked vectors are
combined by the sum (`combine=sum`, MergeKit's default `normalize` false) or the mean (`combine=mean`, MergeKit's
`normalize: true`) of the entries agreeing with the elected sign, θ = θ_0 + λ · that; same defaults as
`breadcrumbs`. A MergeKit config maps onto it with λ, density and gamma as for `breadcrumbs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod
from mergebench_core.engine.exact_topk import keep_count, topk_mask


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


def breadcrumbs_mask(tau: torch.Tensor, keep: float, skip_top: float) -> torch.Tensor:
    """The mask of one task-vector tensor: the magnitude ranks after the ⌊γ'·n⌋ largest (γ = `skip_top`, the
    user's `gamma`), ⌊keep·n⌋ of them (`keep`, the user's `density`)."""
    n = tau.numel()
    top, skip = Pipeline(keep=keep, skip_top=skip_top).counts(n, 1) if skip_top > 0 else (keep_count(keep, n), 0)
    return topk_mask(tau, top) & ~topk_mask(tau, skip)


class Breadcrumbs(TaskVectorPipelineMethod):
    """Task arithmetic on task vectors with their largest and smallest entries masked out, per tensor."""

    name = "breadcrumbs"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        p = self.params
        return Pipeline(keep=p.density, skip_top=p.gamma, scope="tensor", scale=p.scaling_factor)


@dataclass
class TiesParams(Params):
    combine: str = "sum"
    """"sum" or "mean" of the masked entries that agree with the elected sign."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {self.combine!r}")


class BreadcrumbsTies(TaskVectorPipelineMethod):
    """Breadcrumbs' band trim per tensor, then TIES's sign election and the sum (or mean) of the agreeing entries."""

    name = "breadcrumbs_ties"
    Params = TiesParams
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        p = self.params
        return Pipeline(keep=p.density, skip_top=p.gamma, scope="tensor", elect=True, combine=p.combine,
                        scale=p.scaling_factor)


@hookimpl
def register_methods(register):
    register(Breadcrumbs)
    register(BreadcrumbsTies)
