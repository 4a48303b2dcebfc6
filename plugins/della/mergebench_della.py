"""DELLA-Merging (Deep, Bhardwaj and Majumder, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024, arXiv:2406.11617), as MergeKit 0.1.5 runs it (`della`, `della_linear`).

MAGPRUNE drops each task-vector entry at random, with a keep probability that rises with the entry's magnitude rank
along each row (dimension 1) of the tensor, linearly from `density − epsilon` for the smallest to `density +
epsilon` for the largest; the survivors are rescaled so the tensor keeps its L1 norm (MergeKit's rescaling; the paper
divides each survivor by its keep probability, equal in expectation). Then:

- `della`: TIES's sign election and the weighted mean of the agreeing entries (`normalize`, MergeKit's default for
  `della`), θ = θ_0 + λ · that;
- `della_linear`: the plain sum (MergeKit's default `normalize` false for `della_linear`), θ = θ_0 + λ · Σ_t w_t τ'_t.

Both are `mergebench_core.engine.generalized_ta` methods; draws are a hash of (seed, tensor, task, entry), so a run
is reproducible whatever the tensor order.

Defaults. MergeKit's are density 1.0 (no pruning at all), ε 0.15, λ 1.0: a MergeKit config that leaves a parameter
out gets those (`mergekit_defaults`). The benchmark's defaults prune like its TIES: density 0.2 (FusionBench's TIES
k = 0.2) and λ 0.3 (FusionBench's TIES and task-arithmetic λ), for both methods; ε 0.1 keeps the probabilities in
[0.1, 0.3] (MergeKit's ε 0.15 would let the smallest entries through at 0.05). These are this benchmark's choices,
not the paper's (which tunes p, ε and λ per LLM merge). On digits-mlp_TA8, λ 1.0 with density 0.2 averages 51.8 %:
each kept entry carries about 1/density of its tensor's L1 mass, so the mean over agreeing entries is large.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.generalized_ta import (
    GeneralizedTaskArithmeticMethod,
    check_magprune,
    magprune_keep_mask,
)


@dataclass
class Params:
    density: float = 0.2
    """Mean keep probability of each task-vector entry (1.0: no pruning)."""
    epsilon: float = 0.1
    """Half the spread of keep probabilities: from density − ε (smallest magnitude) to density + ε (largest)."""
    scaling_factor: float = 0.3
    """λ (MergeKit's `lambda`) applied to the merged vector."""
    normalize: bool = True
    """Divide by the sum of the weights of the entries that count (a weighted mean); false: their sum."""
    rescale: bool = True
    """Rescale each pruned task-vector tensor to its original L1 norm."""
    weights: list[float] | None = None
    """One weight per expert (MergeKit's per-model `weight`); None: 1 each."""

    def __post_init__(self) -> None:
        check_magprune(self.density, self.epsilon)


@dataclass
class LinearParams(Params):
    normalize: bool = False
    """Divide the sum by Σ_t w_t."""


class Della(GeneralizedTaskArithmeticMethod):
    """Magnitude-ranked random pruning (MAGPRUNE) with L1 rescaling, then TIES's sign election and weighted mean."""

    name = "della"
    Params = Params
    info = MethodInfo(kind="merge", data="none", stochastic=True)
    elect = True
    mergekit_defaults = {"density": 1.0, "epsilon": 0.15, "scaling_factor": 1.0, "normalize": True,
                         "rescale": True}

    def keep_mask(self, key: str, task: int, tau: torch.Tensor) -> torch.Tensor | None:
        p = self.params
        if p.density >= 1.0:
            return None
        if p.density <= 0.0:
            return torch.zeros_like(tau)
        if not tau.any():
            return None  # an untouched tensor (LoRA experts leave most of an LLM alone): nothing to prune
        return magprune_keep_mask(tau, p.density, p.epsilon, self.seed, key, task)


class DellaLinear(Della):
    """MAGPRUNE with L1 rescaling, then the weighted sum of the pruned task vectors (no sign election)."""

    name = "della_linear"
    Params = LinearParams
    elect = False
    mergekit_defaults = {"density": 1.0, "epsilon": 0.15, "scaling_factor": 1.0, "normalize": False,
                         "rescale": True}


@hookimpl
def register_methods(register):
    register(Della)
    register(DellaLinear)
