"""DOP ("Continual Model Merging without Data: Dual Projections for Balancing Stability and Plasticity", NeurIPS 2025;
FusionBench 0.2.33 `fusion_bench.method.dop`): data-free continual merging by optimisation in two singular subspaces.

Experts arrive one at a time (`mergebench_core.contract.continual`); the first is the merged model. When expert t
arrives, each Linear weight W is re-fitted to two targets, the merged weight so far W_m (stability) and the new
expert's W_t (plasticity). For each target i, with τ_i its task vector and U_i S_i V_iᵀ the leading part of its full SVD
(the first k_i singular pairs, k_i the first index where the cumulative share of singular values reaches
`svd_epsilon`), the loss is

    L_i(W) = ‖S_i U_iᵀ (W − W_i)‖²_F + ‖(W − W_i) V_i S_i‖²_F      (`svd_proj_space` uv; u or v keeps one term)

W starts at (W_m + W_t) / 2 and takes `num_steps` Adam steps (lr `lr`) on c_m L_m + c_t L_t. With `mgda` the
weights come from the two-task min-norm solution (Sener & Koltun 2018) on the gradients normalised by their losses,
smoothed by an exponential moving average that starts at (`alpha`, 1 − `alpha`) with decay `ema_beta`; without it
they are (`alpha`, 1 − `alpha`). Every other tensor (biases, norms, embeddings) is the mean of the two.

Defaults are FusionBench's `config/method/dop/dop.yaml`: lr 1e-4, 200 steps, mgda on, ema on, ema_beta 0.999,
alpha 0.8, svd_epsilon 0.99999, svd_proj_space uv. The work is done on task vectors (W − W_0), which shifts every
weight by the same W_0 and leaves gradients and Adam steps unchanged; gradients are the closed forms of the two
terms (2 U S² Uᵀ D and 2 D V S² Vᵀ, D = W − W_i) instead of autograd's. A loss of exactly 0 (a target equal to the
start) is normalised by 1 where the reference divides by zero.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.contract.continual import ContinualMethod

log = logging.getLogger(__name__)

SPACES = ("uv", "u", "v")


@dataclass
class Params:
    lr: float = 1e-4
    """Adam's learning rate (FusionBench dop.yaml)."""
    num_steps: int = 200
    """Adam steps per Linear weight per arrival (FusionBench dop.yaml)."""
    mgda: bool = True
    """Weigh the two losses by the min-norm (MGDA) solution; False uses (alpha, 1 − alpha)."""
    ema: bool = True
    """Smooth the MGDA weights by an exponential moving average started at (alpha, 1 − alpha)."""
    ema_beta: float = 0.999
    """The moving average's decay (FusionBench dop.yaml; its class default is 0.99)."""
    alpha: float = 0.8
    """Weight of the merged model's loss (stability): fixed without MGDA, the EMA's start with it."""
    svd_epsilon: float = 0.99999
    """Share of the singular values' sum each target's subspace keeps."""
    svd_proj_space: str = "uv"
    """Which projections the loss uses: uv (both), u (left), v (right)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be ≥ 0, got {self.num_steps}")
        for name in ("ema_beta", "alpha", "svd_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.svd_proj_space not in SPACES:
            raise ValueError(f"svd_proj_space must be one of {', '.join(SPACES)}, got {self.svd_proj_space!r}")


def leading_subspace(tau: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, s_k, V_k): the first k singular pairs of τ's full SVD, k = the first index whose cumulative share of the
    singular values reaches `epsilon` (`searchsorted`, as the reference)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=True)
    total = s.sum()
    if not bool(total > 0):
        k = 0
    else:
        k = int(torch.searchsorted(s.cumsum(0) / total, torch.tensor(float(epsilon), dtype=s.dtype)).item())
    return u[:, :k], s[:k], vh.T[:, :k]


def min_norm_weight(g0: torch.Tensor, g1: torch.Tensor) -> float:
    """γ minimising ‖γ g0 + (1 − γ) g1‖², clipped to [0.001, 0.999] at the ends (the MGDA two-task rule)."""
    v11, v12, v22 = float((g0 * g0).sum()), float((g0 * g1).sum()), float((g1 * g1).sum())
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)


class DualProjection:
    """The loss of one target and its gradient: projections of D = W − W_i on the target's leading subspaces."""

    def __init__(self, target: torch.Tensor, epsilon: float, space: str):
        self.target = target
        u, s, v = leading_subspace(target, epsilon)
        s2 = s * s
        self.left = (u * s2) @ u.T if space in ("uv", "u") else None  # U S² Uᵀ
        self.right = (v * s2) @ v.T if space in ("uv", "v") else None  # V S² Vᵀ

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        d = w - self.target
        loss = 0.0
        grad = torch.zeros_like(w)
        if self.left is not None:
            ld = self.left @ d
            loss += float((d * ld).sum())  # ‖S Uᵀ D‖² = tr(Dᵀ U S² Uᵀ D)
            grad += 2 * ld
        if self.right is not None:
            dr = d @ self.right
            loss += float((d * dr).sum())
            grad += 2 * dr
        return loss, grad


def dop_matrix(merged: torch.Tensor, tau: torch.Tensor, params: Params) -> torch.Tensor:
    """The re-fitted task vector of one Linear weight from the merged task vector and the new expert's."""
    targets = [DualProjection(merged, params.svd_epsilon, params.svd_proj_space),
               DualProjection(tau, params.svd_epsilon, params.svd_proj_space)]
    w = (merged + tau) / 2
    adam = Adam(w, params.lr)
    weights = [params.alpha, 1 - params.alpha]
    for _ in range(params.num_steps):
        losses, grads = zip(*(t.loss_and_grad(w) for t in targets))
        if params.mgda:
            g = [gr / (loss if loss != 0 else 1.0) for gr, loss in zip(grads, losses)]
            gamma = min_norm_weight(g[0], g[1])
            sol = [gamma, 1 - gamma]
            weights = [params.ema_beta * a + (1 - params.ema_beta) * b for a, b in zip(weights, sol)] \
                if params.ema else sol
        adam.step(weights[0] * grads[0] + weights[1] * grads[1])
    return w


class Adam:
    """torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8, no weight decay) on one tensor, in place, written out
    because the optimiser's first use costs seconds of imports, more than the whole merge of a small model."""

    def __init__(self, w: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.w, self.lr, self.betas, self.eps = w, lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(w), torch.zeros_like(w), 0

    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        correction2 = 1 - b2 ** self.t
        denom = (self.v.sqrt() / math.sqrt(correction2)).add_(self.eps)
        self.w.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


class Dop(ContinualMethod):
    """Re-fit each Linear weight to the merged model and the new expert in their singular subspaces."""

    name = "dop"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def absorb(self, step: int, key: str, merged: torch.Tensor, tau: torch.Tensor, is_matrix: bool) -> torch.Tensor:
        return dop_matrix(merged, tau, self.params) if is_matrix else (merged + tau) / 2


@hookimpl
def register_methods(register):
    register(Dop)
