"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", ICML 2025).

Task arithmetic's summed update M = Σ_t τ_t of a layer has a few dominant singular directions, which drown the
tasks whose directions are weak. Iso-C flattens the spectrum: with M = U Σ Vᵀ, the update becomes σ̄ · U Vᵀ where
σ̄ is the mean singular value, so every direction of the common subspace counts the same.

Iso-CTS keeps the top directions of M as a common subspace (a fraction `common_space_fraction` = 0.8 of the
r = min(rows, cols) directions, adjusted so the rest splits evenly across the T tasks), and fills the remaining
directions with each task's top singular directions *after* projecting the common subspace out of it. The
stacked left and right factors are orthonormalised (polar factor, as in TSV-M), and the spectrum is again set to
its mean.

Conventions (all as the authors' code and FusionBench's port):
- Weight matrices are treated this way, convolution kernels on their matrix view out × (in · prod(k)) (the
  reference code averages them); vectors (biases, norms) are the plain mean of the task vectors.
- The mean singular value runs over all r = min(rows, cols) values, zeros included, and the isotropic update
  spans all r directions. For a rank-deficient sum the directions beyond its rank are whatever the SVD returns;
  fine-tuned task vectors are full rank, so this only matters for synthetic inputs.
- θ = θ_0 + α · merged. The authors tune α on validation data; the defaults here are the values FusionBench's
  CLIP experiment scripts use for ViT-B/32 on eight tasks: α = 1.30 for Iso-C and 1.50 for Iso-CTS (its YAML
  configs default to 1.0; the values grow with model size, 1.40/1.60 for B/16 and 1.50/1.90 for L/14).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import MatrixTaskVectorMethod
from mergebench_core.engine.spectral import iso_cts_spectrum, split_dimensions  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def _check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha):
        raise ValueError(f"scaling_factor must be a finite number, got {alpha}")


@dataclass
class IsoCParams:
    scaling_factor: float = 1.30
    """α; 1.30 is FusionBench's tuned value for CLIP ViT-B/32 on eight tasks."""

    def __post_init__(self) -> None:
        _check_alpha(self.scaling_factor)


@dataclass
class IsoCTSParams:
    scaling_factor: float = 1.50
    """α; 1.50 is FusionBench's tuned value for CLIP ViT-B/32 on eight tasks."""
    common_space_fraction: float = 0.8
    """Share of each layer's r directions given to the common subspace (the paper's default, 0.8)."""

    def __post_init__(self) -> None:
        _check_alpha(self.scaling_factor)
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise ValueError(f"common_space_fraction must be in [0, 1], got {self.common_space_fraction}")


def iso_c_matrix(taus: torch.Tensor) -> torch.Tensor:
    """σ̄ · U Vᵀ for the summed 2-D task vectors Σ_t τ_t = U Σ Vᵀ (taus: (T, m, n))."""
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_matrix(taus: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS of stacked 2-D task vectors (T, m, n) (`mergebench_core.engine.spectral.iso_cts_spectrum`)."""
    return iso_cts_spectrum(taus, common_space_fraction).compose()


class IsoC(MatrixTaskVectorMethod):
    """Task arithmetic with each layer's spectrum made flat (isotropic) in the common subspace."""

    name = "iso_c"
    Params = IsoCParams
    info = MethodInfo(kind="merge", data="none")

    def scale(self) -> float:
        return self.params.scaling_factor

    def merge_matrix(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return iso_c_matrix(taus)


class IsoCTS(MatrixTaskVectorMethod):
    """Iso-C whose least significant common directions are replaced by each task's own top directions."""

    name = "iso_cts"
    Params = IsoCTSParams
    info = MethodInfo(kind="merge", data="none")

    def scale(self) -> float:
        return self.params.scaling_factor

    def merge_matrix(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return iso_cts_matrix(taus, self.params.common_space_fraction)


@hookimpl
def register_methods(register):
    register(IsoC)
    register(IsoCTS)
