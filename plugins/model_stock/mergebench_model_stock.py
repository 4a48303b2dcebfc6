"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024): move from the
pretrained weights toward the average of the fine-tuned ones by a ratio set by how aligned their updates are.

Per tensor, with task vectors τ_t = θ_t − θ_0 (flattened) and N experts:
  cos θ = mean over pairs i < j of ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖)
  t = N·cos θ / (1 + (N − 1)·cos θ),    θ = t·mean_t(θ_t) + (1 − t)·θ_0.
The paper derives t for two models and a single angle; for N > 2 the mean of pairwise cosines is MergeKit's
convention (FusionBench averages the angles instead; the two agree when all angles are equal). The method has no
tunable defaults.

Guards (ours): a pair with a zero task vector has cosine 0 (MergeKit clamps the norm product at 1e-6 to the same
effect). The formula assumes an acute mean angle; when the mean cosine is negative its denominator can vanish or
change sign and t explodes, so cos θ is clamped at 0 (t = 0: the pretrained tensor). How many tensors were
clamped, and the ratio t of every tensor, are stored with the result (`extras`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from mergebench_core import MergebenchError, MergeStream, MethodInfo, TaskVectorMethod, hookimpl

log = logging.getLogger(__name__)


@dataclass
class Params:
    """Model Stock has no parameters: the interpolation ratio comes from the geometry of the experts."""


def mean_pairwise_cosine(taus: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean cosine similarity over all pairs of the flattened task vectors (T, ...); 0 for a pair with a zero one."""
    flat = taus.reshape(len(taus), -1).to(torch.float64)
    norms = flat.norm(dim=1)
    cosines = []
    for i, j in itertools.combinations(range(len(flat)), 2):
        denom = float(norms[i] * norms[j])
        cosines.append(float(flat[i] @ flat[j]) / denom if denom > eps else 0.0)
    return min(1.0, max(-1.0, sum(cosines) / len(cosines)))


def stock_ratio(cos: float, n: int) -> float:
    """t = N·cos / (1 + (N − 1)·cos) for cos in [0, 1]."""
    return n * cos / (1.0 + (n - 1) * cos)


class ModelStock(TaskVectorMethod):
    """Interpolates each tensor between θ_0 and the experts' mean by a ratio set by the angle between updates."""

    name = "model_stock"
    Params = Params
    info = MethodInfo(kind="merge", data="none")
    # not blockwise: the ratio of a tensor depends on the angles between its whole task vectors

    def prepare(self, stream: MergeStream) -> None:
        if stream.num_experts < 2:
            raise MergebenchError(f"model_stock needs at least two fine-tuned models (the angle between their "
                                  f"updates sets the ratio); the pool has {stream.num_experts}")
        self.extras["ratio"] = {}
        self.extras["negative_cosine_tensors"] = 0

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        cos = mean_pairwise_cosine(taus)
        if cos < 0:
            log.debug("model_stock: %s has mean cosine %.3f < 0; using the pretrained tensor", key, cos)
            self.extras["negative_cosine_tensors"] += 1
            cos = 0.0
        t = stock_ratio(cos, len(taus))
        self.extras["ratio"][key] = t
        # t·mean(θ_t) + (1 − t)·θ_0 = θ_0 + t·mean(τ_t)
        return base.to(torch.float32) + t * taus.mean(0)


@hookimpl
def register_methods(register):
    register(ModelStock)
