"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging: Resolving interference when merging
models", NeurIPS 2023).

Conventions (each a parameter):
- `k`: the fraction of each task vector's entries kept by magnitude. Exactly ⌊k·n⌋ entries are kept; among equal
  magnitudes the earlier entry (key order, then flat index) wins. The paper's code keeps every entry at least as
  large as the (n − ⌊k·n⌋)-th smallest, which is one entry more, and more with ties.
- `scope`: "global" ranks magnitudes over the whole model, as the paper's code and FusionBench do (an exact
  threshold found in two streaming passes); "tensor" ranks within each tensor, as MergeKit does.
- Sign election: the sign of the sum of trimmed task vectors. Where that sum is exactly zero, the sign held by
  most of the tensor's elected entries is used (the paper's code takes the majority over the whole model; the two
  differ only where trimmed vectors cancel exactly).
- `combine`: "sum" of the entries that agree with the elected sign (FusionBench's default), or their "mean"
  (the paper's disjoint mean). θ = θ_0 + λ · combined, λ = `scaling_factor` = 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MergeStream, MethodInfo, TensorMergeMethod, hookimpl
from mergebench_core.sparsify import StreamingTopK, keep_count, topk_mask
from mergebench_core.tensors import task_vectors


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


def elect_and_combine(trimmed: torch.Tensor, combine: str) -> torch.Tensor:
    """Elect a sign per entry from trimmed task vectors (T, ...) and combine the entries that agree with it."""
    return elect_and_combine_(trimmed.clone(), combine)


def elect_and_combine_(trimmed: torch.Tensor, combine: str) -> torch.Tensor:
    """`elect_and_combine` that overwrites `trimmed`, sparing a full-size temporary (for callers that own it)."""
    elected = torch.sign(trimmed.sum(0))
    majority = torch.sign(elected.sum())
    elected = torch.where(elected == 0, majority, elected)
    # with elected in {-1, 0, 1}: t·e > 0 exactly when sign(t) == e and t != 0
    agree = torch.mul(trimmed, elected) > 0
    kept = trimmed.mul_(agree)
    if combine == "sum":
        return kept.sum(0)
    return kept.sum(0) / agree.sum(0).clamp(min=1)


def ties_merge(base: torch.Tensor, taus: torch.Tensor, keep: torch.Tensor, params: Params) -> torch.Tensor:
    """θ_0 + λ · TIES(τ); `taus` is overwritten with the trimmed task vectors."""
    return base.to(torch.float32) + params.scaling_factor * elect_and_combine_(taus.mul_(keep), params.combine)


class Ties(TensorMergeMethod):
    """Keep the largest entries of each task vector, elect a sign per entry, and merge the agreeing entries."""

    name = "ties"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def prepare(self, stream: MergeStream) -> None:
        self._topk: StreamingTopK | None = None
        if self.params.scope != "global":
            return
        count = keep_count(self.params.k, stream.numel())
        self._topk = StreamingTopK([count] * stream.num_experts)
        for _, taus in stream.task_vectors():
            self._topk.observe_high(taus)
        for _, taus in stream.task_vectors():
            self._topk.observe_low(taus)
        self.extras["kept_per_task"] = count

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        taus = task_vectors(experts, base)
        if self._topk is not None:
            keep = self._topk.mask(taus)
        else:
            count = keep_count(self.params.k, base.numel())
            keep = torch.stack([topk_mask(t, count) for t in taus])
        return ties_merge(base, taus, keep, self.params)


@hookimpl
def register_methods(register):
    register(Ties)
