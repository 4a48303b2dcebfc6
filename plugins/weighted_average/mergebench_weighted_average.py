"""Weighted averaging of model weights: θ = Σ_t w_t θ_t (the "linear" merge of MergeKit, FusionBench's
`weighted_average`; with equal weights it is the uniform model soup of Wortsman et al., ICML 2022).

Defaults follow FusionBench's `config/method/linear/weighted_average.yaml`: `normalize` = true divides the weights by
their sum, so they need not add up to one. `weights` = None means equal weights (FusionBench's file lists 0.5, 0.5
for its two-model example). Weights are given in the pool's expert order (`mergebench list` shows it); a list of
the wrong length is an error, not silently truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, TensorMergeMethod, hookimpl
from mergebench_core.engine.averaging import normalized, weighted_sum


@dataclass
class Params:
    weights: list[float] | None = None
    """One weight per expert, in pool order; None gives every expert the same weight."""
    normalize: bool = True
    """Divide the weights by their sum (so [2, 1] means [2/3, 1/3])."""

    def __post_init__(self) -> None:
        if self.weights is not None:
            if len(self.weights) == 0:
                raise ValueError("weights must list one weight per expert, got an empty list")
            if self.normalize and abs(sum(self.weights)) < 1e-12:
                raise ValueError(f"weights {list(self.weights)} sum to zero and cannot be normalized; "
                                 f"set normalize=false or change them")


def resolve_weights(weights: list[float] | None, n: int, normalize: bool) -> list[float]:
    """The weight of each of n experts after defaults and normalisation."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergebenchError(f"weights has {len(weights)} entries but there are {n} experts; give one per expert")
    return normalized(weights) if normalize else [float(w) for w in weights]


class WeightedAverage(TensorMergeMethod):
    """A weighted sum of the experts' weights (the base model is not used)."""

    name = "weighted_average"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    requires_base = False
    blockwise = True  # element-wise: large tensors stream in blocks

    def prepare(self, stream: MergeStream) -> None:
        self._weights = resolve_weights(self.params.weights, stream.num_experts, self.params.normalize)
        self.extras["weights"] = self._weights

    def merge_tensor(self, key: str, base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
        return weighted_sum(experts, self._weights)


@hookimpl
def register_methods(register):
    register(WeightedAverage)
