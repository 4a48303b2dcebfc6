"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML 2025).

The paper's observation: the rows of a linear layer's task vector τ_t span (approximately) the inputs that layer
sees on task t. So the interference a merged update τ_m causes on task t can be measured without data as
‖(τ_m − τ_t) τ_tᵀ‖², and the merged update of every 2-D weight is found by minimising

    L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F

with Adam, starting from task arithmetic's Σ_t τ_t; a convolution kernel is the matrix out × (in · prod(k)) that
multiplies unfolded input patches, so it is treated the same way on that view. Every other tensor (biases, norms)
is the mean of the task vectors, and
θ = θ_0 + τ_m (no scaling coefficient). Defaults follow the authors' code (as ported to FusionBench): Adam with
lr = 1e-5, no weight decay, 300 steps (FusionBench's YAML config raises the steps to 400).

The default `lr` is an absolute step size: Adam moves every entry by about `lr` per step whatever the scale of the
weights, so 300 steps of 1e-5 travel about 3e-3, which suits CLIP's task vectors and may be far too short (or too
long) for another model; on the embedded pools it stops well short of the minimum. `relative_lr` makes the step
scale-free: each tensor's learning rate is `relative_lr` times the root mean square of its starting point Σ_t τ_t,
so multiplying every task vector by c multiplies the result by c (up to Adam's ε). The paper fixes an absolute rate;
the relative one is this package's option, off by default.

Implementation note: L is quadratic, with gradient 2 (τ_m A − B) where A = Σ_t τ_tᵀτ_t / ‖τ_t‖² and
B = Σ_t τ_t τ_tᵀτ_t / ‖τ_t‖² (evaluated in a rounding-safe form, see `interference_terms`). Both are computed once
per tensor, so each Adam step costs one (rows × cols × cols)
product instead of a forward and backward pass over all T tasks; the iterates are those of the reference up to
floating-point rounding. The method is deterministic: the seed does not enter (the reference has no randomness).
A task whose task vector is exactly zero adds nothing to L (the reference would divide by zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebench_core import MethodInfo, hookimpl
from mergebench_core.engine.data_free import MatrixTaskVectorMethod


@dataclass
class Params:
    steps: int = 300
    """Adam steps per 2-D tensor (the authors' code; FusionBench's config uses 400)."""
    lr: float = 1e-5
    """Adam learning rate (the authors' code): an absolute step in weight units."""
    relative_lr: float | None = None
    """If set, each tensor's learning rate is this times the RMS of Σ_t τ_t (scale-free; `lr` is then unused)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.relative_lr is not None and not self.relative_lr > 0:
            raise ValueError(f"relative_lr must be > 0 (or unset), got {self.relative_lr}")


def interference_terms(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, C, w) with A = Σ w_t τ_tᵀτ_t, C = Σ w_t (S − τ_t) τ_tᵀτ_t, S = Σ τ_t, w_t = 1 / ‖τ_t‖².

    ∇L(X) = 2 ((X − S) A + C). C is formed from the differences S − τ_t so that it is exactly zero whenever the
    start S already has zero interference (one task; tasks with disjoint supports): Adam normalises its steps,
    and a gradient of rounding noise would otherwise move the iterate by about lr per step.
    """
    sq = taus.flatten(1).square().sum(1)
    w = torch.where(sq > 0, 1.0 / sq.clamp_min(torch.finfo(sq.dtype).tiny), torch.zeros_like(sq))
    grams = taus.transpose(1, 2) @ taus  # (T, n, n)
    a = torch.einsum("t,tij->ij", w, grams)
    c = torch.einsum("t,tmi,tij->mj", w, taus.sum(0) - taus, grams)
    return a, c, w


def interference_loss(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """L(τ_m) as the paper writes it (used by tests and for logging, not by the optimiser)."""
    _, _, w = interference_terms(taus)
    return (w * ((merged.unsqueeze(0) - taus) @ taus.transpose(1, 2)).flatten(1).square().sum(1)).sum()


def wudi_matrix(taus: torch.Tensor, steps: int, lr: float, relative: bool = False) -> torch.Tensor:
    """Minimise L over τ_m by Adam from Σ_t τ_t, for stacked 2-D task vectors (T, m, n); with `relative`, `lr` is a
    multiple of the RMS of Σ_t τ_t."""
    a, c, _ = interference_terms(taus)
    start = taus.sum(0)
    if relative:
        lr = lr * float(start.square().mean().sqrt())
        if lr == 0.0:
            return start
    merged = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        with torch.no_grad():
            merged.grad = 2.0 * ((merged - start) @ a + c)
        opt.step()
    return merged.detach()


class Wudi(MatrixTaskVectorMethod):
    """Find, per linear weight, the update that interferes least with each task's own input subspace."""

    name = "wudi"
    Params = Params
    info = MethodInfo(kind="merge", data="none")

    def merge_matrix(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.relative_lr is not None:
            return wudi_matrix(taus, p.steps, p.relative_lr, relative=True)
        return wudi_matrix(taus, p.steps, p.lr)


@hookimpl
def register_methods(register):
    register(Wudi)
