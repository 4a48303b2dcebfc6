"""CART: centered task arithmetic with a low-rank approximation (Choi et al., "Revisiting Weight Averaging for Model
Merging", arXiv 2412.12153, 2024; the authors' code github.com/JH-GEECS/CART, `src/merging.py`, method "CART").

Weight averaging θ_avg = θ_0 + τ̄ (τ̄ the mean task vector) implicitly centres the task vectors on itself:
τ_t − τ̄. CART keeps only the top singular directions of each centred task vector, per weight matrix, and adds
them back: θ = θ_avg + λ · Σ_t SVD_r(τ_t − τ̄), with rank r = max(1, ⌊ratio · min(rows, cols)⌋). Tensors that are
not weight matrices (biases, norms, embeddings, heads) get θ_avg: their centred vectors sum to exactly zero, which
is what the reference computes for them (it truncates only the attention and MLP weights of the blocks). Convolution
kernels are truncated on their matrix view out × (in · prod(k)) (`mergebench_core.engine.roles`).

Defaults (the authors' config `configs/CART/ViT-b-32_8_CART.yaml`): `rank_ratio` 0.12, λ = `prior` 2.0 for eight
tasks. Their README reports 84.7 average accuracy on CLIP ViT-B/32 TA8 with it (task arithmetic 69.1, weight
averaging 65.9). Their AdaMerging + CART variant (85.8) learns coefficients at test time: the `cart_adamerging` plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import MatrixTaskVectorMethod
from mergebench_core.engine.low_rank import kept_rank


@dataclass
class Params:
    rank_ratio: float = 0.12
    """Fraction of each weight matrix's singular directions kept per centred task vector (at least one)."""
    prior: float = 2.0
    """λ, the scale of the summed low-rank centred task vectors (the authors' `prior`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be a fraction in [0, 1], got {self.rank_ratio}")
        if not math.isfinite(self.prior):
            raise ValueError(f"prior must be a finite number, got {self.prior}")


def low_rank_sum(centred: torch.Tensor, ratio: float) -> torch.Tensor:
    """Σ_t of the rank-r truncations of stacked matrices (T, m, n)."""
    rank = kept_rank(ratio, min(centred.shape[1:]))
    if rank == 0:
        return torch.zeros(centred.shape[1:], dtype=centred.dtype)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)  # batched over tasks
    return torch.einsum("tmr,tr,trn->mn", u[:, :, :rank], s[:, :rank], vh[:, :rank, :])


class Cart(MatrixTaskVectorMethod):
    """Average the experts, then add back the top singular directions of each task's difference from the average."""

    name = "cart"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        shape = tuple(taus.shape[1:])
        mean = taus.mean(0)
        averaged = base.to(torch.float32) + mean
        if self.role(key, shape).kind != "weight":
            return averaged
        view = self.matrix_view(key, shape)
        if view is None:
            return averaged
        centred = view.to_matrix(taus - mean, batch_dims=1)
        return averaged + self.params.prior * view.from_matrix(low_rank_sum(centred, self.params.rank_ratio), shape)


@hookimpl
def register_methods(register):
    register(Cart)
