"""DARE: drop and rescale task vectors before merging (Yu et al., "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", ICML 2024).

Each entry of each task vector is dropped with probability `p` and the survivors are multiplied by 1/(1 − p), so
every entry keeps its expected value. The sparse vectors are then merged by

- `dare_ta`: task arithmetic, θ = θ_0 + λ Σ_t τ̃_t, with λ = 0.3 (FusionBench `config/method/dare/task_arithmetic.yaml`:
  scaling_factor 0.3, sparsity_ratio 0.5, rescale true);
- `dare_ties`: TIES on the dropped vectors (trim to the top `k`, elect signs, combine), with FusionBench's defaults
  from `config/method/dare/ties_merging.yaml`: λ = 0.5, k = 0.2 (threshold 20), combine "sum", magnitudes ranked
  over the whole model. MergeKit's `dare_ties` skips the magnitude trim; set `k=1.0` for that behaviour.

Randomness: the drop mask of tensor `key` comes from `self.generator(key)`, one draw per expert in pool order. It
depends only on the seed and the tensor's name, so a run is reproducible, and the global TIES threshold can be
found in streaming passes that redraw exactly the same masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mergebench_core import MergeStream, MethodInfo, TensorMergeMethod, hookimpl
from mergebench_core.sparsify import StreamingTopK, keep_count, topk_mask
from mergebench_core.tensors import task_vectors
from mergebench_ties import elect_and_combine

log = logging.getLogger(__name__)


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


def drop_and_rescale(taus: torch.Tensor, p: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry of the stacked task vectors (T, ...) with probability p; scale survivors by 1/(1 − p)."""
    if p == 0.0:
        return taus
    keep = torch.stack([torch.rand(t.shape, generator=generator) >= p for t in taus])
    out = taus * keep
    return out / (1.0 - p) if rescale else out


class _Dare(TensorMergeMethod):
    info = MethodInfo(kind="merge", data="none", stochastic=True)

    def dropped(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        """The sparse task vectors of tensor `key`; the same key always gets the same mask for a given seed."""
        return drop_and_rescale(task_vectors(experts, base), self.params.p, self.params.rescale, self.generator(key))


class DareTaskArithmetic(_Dare):
    """Randomly sparsified task vectors, summed and added to the pretrained model."""

    name = "dare_ta"
    Params = TaParams

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        return base.to(torch.float32) + self.params.scaling_factor * self.dropped(key, base, experts).sum(0)


class DareTies(_Dare):
    """Randomly sparsified task vectors, merged with TIES (trim, elect sign, combine the agreeing entries)."""

    name = "dare_ties"
    Params = TiesParams

    def prepare(self, stream: MergeStream) -> None:
        self._topk: StreamingTopK | None = None
        if self.params.scope != "global" or self.params.k >= 1.0:
            return
        count = keep_count(self.params.k, stream.numel())
        self._topk = StreamingTopK([count] * stream.num_experts)
        # Two passes over the dropped vectors (the masks are redrawn identically from each key's generator).
        for key, base, experts in stream:
            self._topk.observe_high(self.dropped(key, base, experts))  # type: ignore[arg-type]
        for key, base, experts in stream:
            self._topk.observe_low(self.dropped(key, base, experts))  # type: ignore[arg-type]
        self.extras["kept_per_task"] = count

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        taus = self.dropped(key, base, experts)
        if self.params.k >= 1.0:
            keep = torch.ones_like(taus, dtype=torch.bool)
        elif self._topk is not None:
            keep = self._topk.mask(taus)
        else:
            count = keep_count(self.params.k, base.numel())
            keep = torch.stack([topk_mask(t, count) for t in taus])
        merged = elect_and_combine(taus * keep, self.params.combine)
        return base.to(torch.float32) + self.params.scaling_factor * merged


@hookimpl
def register_methods(register):
    register(DareTaskArithmetic)
    register(DareTies)
