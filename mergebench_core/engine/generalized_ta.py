"""MergeKit's generalized task arithmetic on whole tensors: sparsify each task vector, rescale it to its old L1 norm,
weight it, optionally elect a sign per entry, then sum (or take the weighted mean of) what is left.

This is the per-tensor form MergeKit 0.1.5 (`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`) gives its
`dare_linear`, `della` and `della_linear`, written once here for every method that needs it:

- **sparsify**: a method-specific 0/1 mask per task (random with one keep probability: DARE; random with a keep
  probability that grows with the entry's magnitude rank: DELLA's MAGPRUNE, `magprune_keep_probability`). The
  uniform draws come from the same (seed, tensor, task, entry) hash as the streamed pipeline's DARE
  (`task_vector_stages.uniform_draws`), so a run is reproducible and independent of tensor order.
- **rescale** (`l1_rescale`): the kept entries are multiplied by ‖τ‖₁ / ‖kept‖₁, MergeKit's `RescaleNorm.l1` (the
  DARE and DELLA papers divide each kept entry by its keep probability instead; the two agree in expectation).
- **weight**, **elect**, **combine** (`consensus_merge`): τ'_t ← w_t τ'_t; with election an entry counts only where
  its sign equals the elected one (the core's one rule: the sign of the sum, a sum of exactly zero elects +,
  `task_vector_stages.SIGN_RULE`); `normalize` divides by the sum of the weights that count there (by Σ w_t
  without election), as MergeKit does.
- **scale**: θ = θ_0 + λ · merged.

Methods built on this read whole tensors (a rank along a row and an L1 norm over the tensor are not column-local),
so they are not `blockwise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mergebench_core.engine.data_free import TaskVectorMethod
from mergebench_core.engine.task_vector_stages import signed_total, uniform_draws
from mergebench_core.errors import MergebenchError

__all__ = ["GeneralizedTaskArithmeticMethod", "check_magprune", "consensus_merge", "l1_rescale",
           "magprune_keep_mask", "magprune_keep_probability", "uniform_draws"]


def l1_rescale(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` (τ with entries zeroed) times ‖τ‖₁ / ‖kept‖₁, so the sparse vector has τ's L1 norm; left alone when
    either norm is below `eps` (MergeKit's guard against dividing by nothing)."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magprune_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities: along dimension 1 of the tensor (the whole vector for a 1-D tensor, each
    row of a matrix, as MergeKit's `della_magprune`), entries are ranked by magnitude and the keep probability rises
    linearly from density − ε (smallest) to density + ε (largest). Equal magnitudes take ranks in index order."""
    x = tau.reshape(1, -1) if tau.dim() < 2 else tau  # a scalar is a row of one (MergeKit fails on it)
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(torch.float32)
    width = x.shape[1] - 1
    spread = ranks / width if width > 0 else torch.zeros_like(ranks)  # rank 0 → 0, the largest → 1
    probs = (density - epsilon) + spread.clamp_(0, 1) * (2 * epsilon)
    return probs.reshape(tau.shape)


MAGPRUNE_BLOCK = 1 << 20
"""Entries whose MAGPRUNE mask is made at once: its argsorts, ranks and draws take about 30 bytes an entry, which on
a whole LLM embedding (262,144 × 640 for Gemma-3-270M) is 5 GB per expert; a block keeps it at 30 MB."""


def magprune_keep_mask(tau: torch.Tensor, density: float, epsilon: float, seed: int, key: str, task: int,
                       block: int = MAGPRUNE_BLOCK) -> torch.Tensor:
    """0/1 mask (tau's dtype) of the entries MAGPRUNE keeps: entry i is kept when its draw
    (`uniform_draws(seed, key, task)`) is below its keep probability (`magprune_keep_probability`). Made a block of
    rows at a time (ranks are along dimension 1, within each row; draws depend only on the entry's index), with the
    same bits as the whole tensor at once."""
    if tau.dim() < 2 or tau.shape[0] == 0:
        probs = magprune_keep_probability(tau, density, epsilon)
        draws = uniform_draws(seed, key, task, tau.numel(), tau.device).view(tau.shape)
        return (draws < probs.to(torch.float64)).to(tau.dtype)
    mask = torch.empty_like(tau)
    per_row = tau[0].numel()
    rows = max(1, block // max(1, per_row))
    for i in range(0, tau.shape[0], rows):
        part = tau[i:i + rows]
        probs = magprune_keep_probability(part, density, epsilon)
        draws = uniform_draws(seed, key, task, part.numel(), tau.device, start=i * per_row).view(part.shape)
        mask[i:i + rows] = draws < probs.to(torch.float64)
    return mask


def check_magprune(density: float, epsilon: float) -> None:
    """MAGPRUNE needs every probability density ± ε inside (0, 1) when it prunes at all (density < 1)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a fraction in [0, 1], got {density}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if 0.0 < density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise ValueError(f"density ± epsilon must lie in (0, 1): density {density} and epsilon {epsilon} give "
                         f"[{density - epsilon:g}, {density + epsilon:g}]; lower epsilon")


def consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, elect: bool, normalize: bool) -> torch.Tensor:
    """Weighted (T, ...) task vectors (already multiplied by their weights (T,)) → the merged vector: the sum of the
    entries that agree with the elected sign (all of them without `elect`), divided by the weights that count there
    when `normalize` (a divisor of 0, or below 1e-8 without election, counts as 1, as in MergeKit)."""
    w = weights.view(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
    if not elect:
        merged = deltas.sum(0)
        if normalize:
            total = weights.sum()
            merged = merged / (total if total.abs() >= 1e-8 else 1.0)
        return merged
    flat = deltas.reshape(len(deltas), -1)
    elected = torch.where(signed_total(flat) >= 0, 1.0, -1.0).view(deltas.shape[1:])
    agree = (torch.sign(deltas) == elected).to(deltas.dtype)
    merged = (deltas * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


class GeneralizedTaskArithmeticMethod(TaskVectorMethod):
    """A MergeKit generalized task-arithmetic method: implement `keep_mask` (or none, to keep every entry) and set
    `elect`. Its Params carry `scaling_factor` (MergeKit's `lambda`), `normalize`, `rescale` and `weights` (None: 1
    for every expert), under MergeKit's names so that `mergebench merge --config` maps them one to one."""

    elect: ClassVar[bool] = False
    mergekit_defaults: ClassVar[dict[str, Any]] = {}
    """MergeKit's own defaults of the method's parameters: a MergeKit config that leaves one out gets these, not the
    benchmark defaults of the Params (`mergebench_core.mergekit.methods.generic_call`)."""

    def keep_mask(self, key: str, task: int, tau: torch.Tensor) -> torch.Tensor | None:
        """Float 0/1 mask of the entries of task `task`'s τ (its tensor's shape) kept, or None to keep them all."""
        return None

    def _weights(self, count: int, device: torch.device) -> torch.Tensor:
        given: Sequence[float] | None = getattr(self.params, "weights", None)
        if given is None:
            return torch.ones(count, dtype=torch.float32, device=device)
        if len(given) != count:
            raise MergebenchError(f"{self.name}.weights has {len(given)} values for {count} experts; give one per "
                                  f"expert, in the pool's (or the config's) order")
        return torch.tensor([float(x) for x in given], dtype=torch.float32, device=device)

    def merge_task_vectors(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        p = self.params
        for t in range(len(taus)):
            mask = self.keep_mask(key, t, taus[t])
            if mask is None:
                continue
            kept = taus[t] * mask
            taus[t] = l1_rescale(taus[t], kept) if p.rescale else kept
        weights = self._weights(len(taus), taus.device)
        taus.mul_(weights.view(-1, *([1] * (taus.dim() - 1))))
        merged = consensus_merge(taus, weights, self.elect, p.normalize)
        return base.to(torch.float32) + p.scaling_factor * merged
