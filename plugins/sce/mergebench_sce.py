"""SCE merging (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, arXiv:2408.07990), as MergeKit 0.1.5
runs it (`sce`): per tensor, on task vectors τ_t = θ_t − θ_0,

1. **select**: keep the entries where the experts disagree most: the ⌊select_topk · m⌋ entries of largest variance
   across experts (population variance), m the number of entries whose variance is not zero; the others are zeroed
   in every τ_t (skipped when select_topk = 1);
2. **calculate**: each expert's weight is its mean squared (selected) task vector over the tensor, normalised to sum
   to 1 (uniform when the total is below 1e-6);
3. **erase**: entries whose sign differs from the elected one (the core's one rule: the sign of the sum, a sum of
   exactly zero elects +) are dropped; θ = θ_0 + Σ_t w_t τ_t [agrees] / max(Σ_t w_t [agrees], 1e-6).

Ties in variance go to the earlier entry (`mergebench_core.engine.exact_topk.topk_mask`; MergeKit's `torch.topk`
leaves them to the kernel). SCE has no scaling factor: the result is a weighted mean of task vectors.

Default `select_topk` = 1.0, MergeKit's: every entry is selected, and SCE is the energy-weighted mean of the
sign-agreeing entries (on digits-mlp_TA8 this gives 80.2 % where select_topk 0.1 gives 72.8 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import TaskVectorMethod
from mergebench_core.engine.exact_topk import topk_mask
from mergebench_core.engine.task_vector_stages import signed_total


@dataclass
class Params:
    select_topk: float = 1.0
    """Fraction of the entries with non-zero variance across experts that is kept (1.0: all)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.select_topk <= 1.0:
            raise ValueError(f"select_topk must be a fraction in [0, 1], got {self.select_topk}")


def variance_mask(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float 0/1 mask (entries of one tensor) of the ⌊fraction · m⌋ entries of largest variance across the rows of
    `taus` (T, n), m the count of non-zero variances."""
    if fraction >= 1.0:
        return torch.ones_like(taus[0])
    var = taus.var(0, unbiased=False)
    count = int(int(torch.count_nonzero(var)) * fraction)
    return topk_mask(var, count).to(taus.dtype)


def sce_weights(taus: torch.Tensor) -> torch.Tensor:
    """Each expert's mean squared task vector (T,), normalised to sum 1; uniform when they sum below 1e-6."""
    energy = taus.square().mean(1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / len(energy))
    return energy / total


class Sce(TaskVectorMethod):
    """Select the highest-variance entries, weight experts by their task vectors' energy, erase minority signs."""

    name = "sce"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    mergekit_defaults: ClassVar[dict[str, float]] = {"select_topk": 1.0}

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        flat = taus.reshape(len(taus), -1)
        flat.mul_(variance_mask(flat, self.params.select_topk))
        elected = torch.where(signed_total(flat) >= 0, 1.0, -1.0)
        agree = (torch.sign(flat) == elected).to(flat.dtype)
        weighted = agree.mul_(sce_weights(flat).view(-1, 1))  # w_t where τ_t agrees, else 0
        merged = (flat * weighted).sum(0) / weighted.sum(0).clamp(min=1e-6)
        return base.to(torch.float32) + merged.view(base.shape)


@hookimpl
def register_methods(register):
    register(Sce)
