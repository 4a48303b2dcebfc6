"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

For every 2-D weight, each task vector τ_t = U_t Σ_t V_tᵀ is cut to its top ⌊r/T⌋ singular directions
(r = min(rows, cols), T tasks), so the T truncated factors fit side by side in a rank-r budget. The concatenated
left factors [U_1 … U_T] and right factors [V_1 … V_T] are then replaced by their nearest orthonormal matrices
(the polar factor, i.e. the orthogonal Procrustes solution, computed by an SVD), which removes the interference
between tasks' subspaces, and the layer update is Û diag(Σ_1 … Σ_T) V̂ᵀ.

Convolution kernels (out, in, *k) are merged the same way on their matrix view out × (in · prod(k)) and reshaped
back (the reference code averages them; mergebench reads every tensor through its role, `mergebench_core.engine.roles`).
Vectors (biases, norms, the class embedding) are averaged over tasks, as the reference code does; a tensor with no
usable matrix view (a grouped convolution) is averaged too, with a warning and a count in the extras. θ = θ_0 + α · merged, with α = `alpha` = 1.0 (the paper's code and FusionBench's
`TaskSingularVectorMerging` config both use 1.0; there is no tuned coefficient in the method).

Consequence worth knowing: 2-D tensors are effectively *summed* (α Σ τ when tasks are orthogonal) while other
tensors are *averaged* (α Σ τ / T). That is the published behaviour, kept on purpose.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import MatrixTaskVectorMethod
from mergebench_core.engine.spectral import tsv_spectrum

log = logging.getLogger(__name__)


@dataclass
class Params:
    alpha: float = 1.0
    """Scale of the merged task vector (the reference code's default)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")


def tsv_merge_matrix(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M of stacked 2-D task vectors (T, m, n): truncate each, concatenate, orthogonalise, reconstruct
    (`mergebench_core.engine.spectral.tsv_spectrum`)."""
    return tsv_spectrum(taus).compose()


class TsvMerge(MatrixTaskVectorMethod):
    """Keep each task's top singular directions per layer, decorrelate them across tasks, and add them up."""

    name = "tsv_m"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def scale(self) -> float:
        return self.params.alpha

    def merge_matrix(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        if min(taus.shape[1:]) < taus.shape[0]:
            log.warning("tsv_m: %s %s has fewer singular directions than tasks (%d); its update is zero, as in "
                        "the reference code", key, list(taus.shape[1:]), taus.shape[0])
        return tsv_merge_matrix(taus)


@hookimpl
def register_methods(register):
    register(TsvMerge)
