"""DARE: drop and rescale task vectors before merging (Yu et al., "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", ICML 2024).

Each entry of each task vector is dropped with probability `p` and the survivors are multiplied by 1/(1 − p), so
every entry keeps its expected value. The sparse vectors are then merged by

- `dare_ta`: task arithmetic, θ = θ_0 + λ Σ_t τ̃_t, with λ = 0.3 (FusionBench `config/method/dare/task_arithmetic.yaml`:
  scaling_factor 0.3, sparsity_ratio 0.5, rescale true);
- `dare_ties`: TIES on the dropped vectors (trim to the top `k`, elect signs, combine), with FusionBench's defaults
  from `config/method/dare/ties_merging.yaml`: λ = 0.5, k = 0.2 (threshold 20), combine "sum", magnitudes ranked
  over the whole model. MergeKit's `dare_ties` skips the magnitude trim; set `k=1.0` for that behaviour.

- `dare_linear`: MergeKit 0.1.5's `dare_linear`, under MergeKit's parameter names: each entry kept with probability
  `density`, the survivors rescaled so each tensor keeps its L1 norm (MergeKit's `rescale`, not 1/(1 − p)), then
  the weighted sum (`normalize`: divided by Σ w), θ = θ_0 + λ · that (`mergebench_core.engine.generalized_ta`).
  Benchmark defaults density 0.5 (DARE's p = 0.5) and λ 0.3 (as `dare_ta`); a MergeKit config that leaves one out
  gets MergeKit's (density 1.0, λ 1.0, normalize false, rescale true). The same seed drops the same entries as
  `dare_ta` with p = 1 − density.

Randomness: whether entry i of tensor `key` is dropped for expert t is a hash of (seed, key, t, i)
(`mergebench_core.engine.pipeline.drop_keep`). It depends on nothing else, so a run is reproducible, blocks of any size and
any device draw the same masks, and the exact trim threshold of `dare_ties` is found with the same sample-and-count
pass as TIES's, on the dropped vectors. Both methods are `mergebench_core.engine.pipeline` pipelines (drop, then for
`dare_ties` trim, elect with its one sign rule, combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.generalized_ta import GeneralizedTaskArithmeticMethod
from mergebench_core.engine.pipeline import Pipeline, TaskVectorPipelineMethod, drop_keep


def _check_drop(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p (the drop probability) must be in [0, 1), got {p}; p = 1 would drop every entry")


@dataclass
class TaParams:
    p: float = 0.5
    """Probability of dropping each task-vector entry."""
    rescale: bool = True
    """Multiply the kept entries by 1/(1 − p) (DARE's rescaling); false gives plain random dropping."""
    scaling_factor: float = 0.3
    """λ applied to the summed sparse task vectors."""

    def __post_init__(self) -> None:
        _check_drop(self.p)


@dataclass
class TiesParams:
    p: float = 0.5
    """Probability of dropping each task-vector entry."""
    rescale: bool = True
    """Multiply the kept entries by 1/(1 − p) (DARE's rescaling)."""
    scaling_factor: float = 0.5
    """λ applied to the TIES-merged vector (FusionBench's DARE-TIES default)."""
    k: float = 0.2
    """Fraction of each dropped task vector kept by magnitude before the sign election; 1.0 skips the trim."""
    combine: str = "sum"
    """"sum" or "mean" of the entries that agree with the elected sign."""
    scope: str = "global"
    """"global" (one magnitude threshold per task over the whole model) or "tensor"."""

    def __post_init__(self) -> None:
        _check_drop(self.p)
        if not 0.0 <= self.k <= 1.0:
            raise ValueError(f"k must be a fraction in [0, 1], got {self.k}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {self.combine!r}")
        if self.scope not in ("global", "tensor"):
            raise ValueError(f"scope must be 'global' or 'tensor', got {self.scope!r}")


class DareTaskArithmetic(TaskVectorPipelineMethod):
    """Randomly sparsified task vectors, summed and added to the pretrained model."""

    name = "dare_ta"
    Params = TaParams
    info = MethodInfo(kind="merge", data="none", stochastic=True)

    def pipeline(self) -> Pipeline:
        p = self.params
        return Pipeline(drop=p.p, rescale=p.rescale, scale=p.scaling_factor)


class DareTies(TaskVectorPipelineMethod):
    """Randomly sparsified task vectors, merged with TIES (trim, elect sign, combine the agreeing entries)."""

    name = "dare_ties"
    Params = TiesParams
    info = MethodInfo(kind="merge", data="none", stochastic=True)

    def pipeline(self) -> Pipeline:
        p = self.params
        return Pipeline(drop=p.p, rescale=p.rescale, keep=p.k, scope=p.scope, elect=True, combine=p.combine,
                        scale=p.scaling_factor)


@dataclass
class LinearParams:
    density: float = 0.5
    """Probability of keeping each task-vector entry (1 − DARE's p)."""
    scaling_factor: float = 0.3
    """λ (MergeKit's `lambda`) applied to the summed sparse task vectors."""
    normalize: bool = False
    """Divide the sum by Σ_t w_t."""
    rescale: bool = True
    """Rescale each sparse task-vector tensor to its original L1 norm (MergeKit's rescaling)."""
    weights: list[float] | None = None
    """One weight per expert (MergeKit's per-model `weight`); None: 1 each."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density (the keep probability) must be in [0, 1], got {self.density}")


class DareLinear(GeneralizedTaskArithmeticMethod):
    """Randomly sparsified task vectors rescaled to their L1 norm, weighted and summed (MergeKit's dare_linear)."""

    name = "dare_linear"
    Params = LinearParams
    info = MethodInfo(kind="merge", data="none", stochastic=True)
    mergekit_defaults = {"density": 1.0, "scaling_factor": 1.0, "normalize": False, "rescale": True}

    def keep_mask(self, key: str, task: int, tau: torch.Tensor) -> torch.Tensor | None:
        if self.params.density >= 1.0:
            return None
        keep = drop_keep(self.seed, key, task, range(tau.numel()), 1.0 - self.params.density, tau.device)
        return keep.view(tau.shape)


@hookimpl
def register_methods(register):
    register(DareTaskArithmetic)
    register(DareTies)
    register(DareLinear)
