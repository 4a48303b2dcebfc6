"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging: Resolving interference when merging
models", NeurIPS 2023), on the core's task-vector pipeline (`mergebench_core.engine.pipeline`).

Conventions (each a parameter):
- `k`: the fraction of each task vector's entries kept by magnitude. Exactly ⌊k·n⌋ entries are kept; among equal
  magnitudes the earlier entry (key order, then flat index) wins. The paper's code keeps every entry at least as
  large as the (n − ⌊k·n⌋)-th smallest, which is one entry more, and more with ties; MergeKit keeps
  max(1, ⌊k·n⌋) per tensor and breaks ties arbitrarily.
- `scope`: "global" ranks magnitudes over the whole model, as the paper's code and FusionBench do; "tensor" ranks
  within each tensor, as MergeKit does. Both are exact and stream: a sample brackets each threshold and one counting
  pass settles it (for "tensor", only tensors larger than a block need that pass; the others are settled in memory).
- Sign election: the sign of the sum of the trimmed task vectors, and a sum of exactly 0 elects + (the pipeline's
  one rule, `mergebench_core.engine.pipeline.SIGN_RULE`, MergeKit's). The paper's code fills such entries with the
  majority sign of the whole model; the two differ only where trimmed vectors cancel exactly.
- `combine`: "sum" of the entries that agree with the elected sign (FusionBench's default), or their "mean"
  (the paper's disjoint mean). θ = θ_0 + λ · combined, λ = `scaling_factor` = 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod
from mergebench_core.engine.task_vector_stages import combine


@dataclass
class Params:
    scaling_factor: float = 0.3
    """λ applied to the merged task vector."""
    k: float = 0.2
    """Fraction of each task vector's entries kept (by magnitude)."""
    combine: str = "sum"
    """"sum" or "mean" of the entries that agree with the elected sign."""
    scope: str = "global"
    """"global" (one threshold per task over the whole model) or "tensor" (per tensor)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.k <= 1.0:
            raise ValueError(f"k must be a fraction in [0, 1], got {self.k}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {self.combine!r}")
        if self.scope not in ("global", "tensor"):
            raise ValueError(f"scope must be 'global' or 'tensor', got {self.scope!r}")


def ties_pipeline(params: Params) -> Pipeline:
    return Pipeline(keep=params.k, scope="tensor" if params.scope == "tensor" else "global", elect=True,
                    combine=params.combine, scale=params.scaling_factor)


def elect_and_combine(trimmed: torch.Tensor, combine_how: str) -> torch.Tensor:
    """Elect a sign per entry from trimmed task vectors (T, ...) and combine the entries that agree with it."""
    flat = trimmed.reshape(len(trimmed), -1)
    return combine(flat, Pipeline(elect=True, combine=combine_how)).view(trimmed.shape[1:])


class Ties(TaskVectorPipelineMethod):
    """Keep the largest entries of each task vector, elect a sign per entry, and merge the agreeing entries."""

    name = "ties"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def pipeline(self) -> Pipeline:
        return ties_pipeline(self.params)


@hookimpl
def register_methods(register):
    register(Ties)
