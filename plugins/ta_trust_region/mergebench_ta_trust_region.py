"""Task Arithmetic in Trust Region (TATR; Sun et al., "Task Arithmetic in Trust Region: A Training-Free Model Merging
Approach to Navigate Knowledge Conflicts", ICLR 2025).

Adding τ_j moves task i's loss by about ∇L_i · τ_j; where both |∇L_i| and |τ_j| are large, the tasks conflict. TATR
scores every parameter entry by Ω = Σ_i Σ_{j≠i} |∇L_i(θ_0)| ⊙ |τ_j| and drops the entries whose Ω is not below the
`threshold_quantile`-quantile of Ω over the whole model (the trust region is the rest), then does task arithmetic:
θ = θ_0 + λ Σ_t τ_t ⊙ [Ω < q].

- `ta_trust_region` (labeled data): |∇L_i| is the mean over `n_examples` training examples of task i of the
  absolute per-example gradient of the cross-entropy at the pretrained model (`mergebench_core.data.statistics.
  mean_abs_gradient`, cached and shared). FusionBench 0.2.33 stores each task's average under the loop variable
  of its parameter loop instead of the task's name, so every task overwrites one entry and its Ω is zero
  (nothing is merged); this follows the paper's definition, one gradient per task.
- `ta_trust_region_zs` (data-free, FusionBench's `zero_shot: true`): |τ_i| stands in for |∇L_i|, so
  Ω = Σ_{i≠j} |τ_i| ⊙ |τ_j| = (Σ_t |τ_t|)² − Σ_t τ_t².

The threshold is FusionBench's: Ω sorted ascending over every parameter entry, the value at index
min(⌊n·q⌋, n − 1), entries strictly below it kept. Only parameters are merged (buffers keep θ_0's values), as
FusionBench merges the model's trainable parameters.

Defaults (FusionBench's `method/trust_region/clip_task_arithmetic.yaml`): λ = `scaling_factor` = 0.3,
`threshold_quantile` = 0.99, `max_samples` = 128 (`n_examples` here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergebench_core import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.data.statistic_merge import StatisticParams, StatisticRun
from mergebench_core.engine.parameter_task_vectors import ParameterTaskVectors

log = logging.getLogger(__name__)


@dataclass
class ZeroShotParams:
    scaling_factor: float = 0.3
    """λ of task arithmetic over the trust region."""
    threshold_quantile: float = 0.99
    """Entries whose conflict score Ω reaches this quantile (over the whole model) are removed."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.scaling_factor):
            raise ValueError(f"scaling_factor must be a finite number, got {self.scaling_factor}")
        if not 0.0 <= self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must be in [0, 1], got {self.threshold_quantile}")


@dataclass
class Params(StatisticParams):
    scaling_factor: float = 0.3
    """λ of task arithmetic over the trust region."""
    threshold_quantile: float = 0.99
    """Entries whose conflict score Ω reaches this quantile (over the whole model) are removed."""
    n_examples: int = 128
    """Training examples per task behind each mean absolute gradient (FusionBench's `max_samples`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ZeroShotParams(self.scaling_factor, self.threshold_quantile)


def conflict_scores(importances: Sequence[Mapping[str, torch.Tensor]], taus: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Ω per key: Σ_i importance_i ⊙ Σ_{j≠i} |τ_j|, with taus stacked (T, ...) per key."""
    out = {}
    for key, stacked in taus.items():
        mags = stacked.abs()
        total = mags.sum(0)
        out[key] = sum(imp[key].to(mags) * (total - mags[i]) for i, imp in enumerate(importances))
    return out


def trust_region_threshold(scores: Mapping[str, torch.Tensor], quantile: float) -> torch.Tensor:
    """The value at index min(⌊n·q⌋, n − 1) of every score sorted ascending (FusionBench's rule)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    index = max(0, min(int(flat.numel() * quantile), flat.numel() - 1))
    return torch.kthvalue(flat, index + 1).values


def trust_region_merge(base: Mapping[str, torch.Tensor], taus: Mapping[str, torch.Tensor],
                       importances: Sequence[Mapping[str, torch.Tensor]], scaling_factor: float,
                       quantile: float) -> tuple[dict[str, torch.Tensor], float]:
    """θ_0 + λ Σ_t τ_t ⊙ [Ω < threshold] for every key of `taus`; also the fraction of entries kept."""
    scores = conflict_scores(importances, taus)
    threshold = trust_region_threshold(scores, quantile)
    merged, kept, total = {}, 0, 0
    for key, stacked in taus.items():
        mask = scores[key] < threshold
        kept, total = kept + int(mask.sum()), total + mask.numel()
        merged[key] = (base[key].float() + scaling_factor * (stacked * mask).sum(0)).to(base[key].dtype)
    return merged, kept / max(total, 1)


class _TrustRegion(Method):
    def importances(self, pool: ModelPool, ctx: RunContext, taus: Mapping[str, torch.Tensor]
                    ) -> tuple[list[Mapping[str, torch.Tensor]], dict]:
        raise NotImplementedError

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        tv = ParameterTaskVectors.of(self, pool)
        importances, extras = self.importances(pool, ctx, tv.taus)
        merged, kept = trust_region_merge(tv.base, tv.taus, importances, self.params.scaling_factor,
                                          self.params.threshold_quantile)
        log.info("%s: %.4f of the parameter entries lie in the trust region", self.name, kept)
        tv.model.load_state_dict({**tv.base, **merged})
        return MergeOutput(tv.model, extras={**extras, "kept_fraction": kept})


class TrustRegionZeroShot(_TrustRegion):
    """TATR without data: each task's |τ| estimates the magnitude of its loss gradient."""

    name = "ta_trust_region_zs"
    Params = ZeroShotParams
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def importances(self, pool, ctx, taus):
        n = len(pool.expert_names)
        return [{k: v[i].abs() for k, v in taus.items()} for i in range(n)], {}


class TrustRegion(_TrustRegion):
    """TATR: conflict scores from each task's mean absolute gradient at the pretrained model."""

    name = "ta_trust_region"
    Params = Params
    info = MethodInfo(kind="merge", data="labeled", task_vectors=True)

    def importances(self, pool, ctx, taus):
        run = StatisticRun.open(self, pool, ctx)
        grads = [run.abs_gradients(PRETRAINED, pool.task_of(e)) for e in pool.expert_names]
        return grads, run.extras()


@hookimpl
def register_methods(register):
    register(TrustRegion)
    register(TrustRegionZeroShot)
