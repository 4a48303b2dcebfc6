"""Merged updates as sums of rank-one components, Σ_j s_j p_j q_jᵀ, for the spectral methods (TSV-M, Iso-CTS, task
arithmetic seen through each task's SVD) and for AdaRank, which learns which components to keep.

A `Spectrum` holds the left factors P (m, R), the values s (R,), the right factors Q (R, n) and, per component, the
group it came from (task t in 0..T−1, or T for Iso-CTS's common subspace). `compose()` is the method's own merged
update, computed with the very operations the method always used (so moving a method here changes no stored bit);
`compose(weights)` scales each component first (a mask, learned coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergebench_core.engine.tensor_math import polar_factor


@dataclass
class Spectrum:
    left: Tensor
    """P, (m, R): the components' left singular vectors (orthonormalised for TSV-M and Iso-CTS)."""
    values: Tensor
    """s, (R,)."""
    right: Tensor
    """Q, (R, n)."""
    groups: Tensor
    """(R,) long: the task each component belongs to, or the number of tasks for a common component."""
    level: Tensor | None = None
    """Iso-CTS: the one singular value every component gets (the mean of the spectrum); None otherwise."""

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def compose(self, weights: Tensor | None = None) -> Tensor:
        """Σ_j w_j s_j p_j q_jᵀ; without weights, exactly the method's merged update."""
        if weights is None:
            if self.level is not None:
                return self.level * (self.left @ self.right)
            return (self.left * self.values) @ self.right
        return (self.left * (self.values * weights)) @ self.right


def tsv_spectrum(taus: Tensor) -> Spectrum:
    """TSV-M of stacked 2-D task vectors (T, m, n): each task's top ⌊r/T⌋ directions, the concatenated left and right
    factors replaced by their polar factors (Gargiulo et al., CVPR 2025)."""
    n_tasks, m, n = taus.shape
    keep = min(m, n) // n_tasks
    groups = torch.arange(n_tasks).repeat_interleave(keep)
    if keep == 0:
        return Spectrum(torch.zeros(m, 0, dtype=taus.dtype), torch.zeros(0, dtype=taus.dtype),
                        torch.zeros(0, n, dtype=taus.dtype), groups)
    u, s, vh = torch.linalg.svd(taus, full_matrices=False)  # batched over tasks
    u_cat = u[:, :, :keep].permute(1, 0, 2).reshape(m, n_tasks * keep)  # [U_1 … U_T], task-major columns
    s_cat = s[:, :keep].reshape(-1)
    vh_cat = vh[:, :keep, :].reshape(n_tasks * keep, n)  # [V_1 … V_T]ᵀ
    return Spectrum(polar_factor(u_cat), s_cat, polar_factor(vh_cat), groups)


def split_dimensions(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's (common directions, directions per task): the task-specific share is rounded to a multiple of T.
    This is the reference rule, round((r − ⌊f·r⌋) / T) per task, clamped so the tasks never ask for more than r."""
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / n_tasks), rank // n_tasks)
    return rank - per_task * n_tasks, per_task


def iso_cts_spectrum(taus: Tensor, common_space_fraction: float) -> Spectrum:
    """Iso-CTS of stacked 2-D task vectors (T, m, n) (Marczak et al., ICML 2025): the top directions of Σ_t τ_t, then
    each task's top directions with that common subspace projected out, orthonormalised, at one singular value."""
    n_tasks, m, n = taus.shape
    common, per_task = split_dimensions(min(m, n), n_tasks, common_space_fraction)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    if per_task > 0:
        residual = taus - u_c @ (u_c.T @ taus)  # each task with the common subspace projected out (left side)
        u_t, s_t, vh_t = torch.linalg.svd(residual, full_matrices=False)
        us = [u_t[t, :, :per_task] for t in range(n_tasks)]
        ss = [s_t[t, :per_task] for t in range(n_tasks)]
        vhs = [vh_t[t, :per_task] for t in range(n_tasks)]
    u_all = torch.cat(us + [u_c], dim=1)
    s_all = torch.cat(ss + [s_c])
    vh_all = torch.cat(vhs + [vh_c], dim=0)
    groups = torch.cat([torch.arange(n_tasks).repeat_interleave(per_task), torch.full((common,), n_tasks)])
    level = s_all.mean()
    return Spectrum(polar_factor(u_all), level.expand(s_all.numel()), polar_factor(vh_all), groups, level)


def task_spectrum(taus: Tensor) -> Spectrum:
    """Task arithmetic's Σ_t τ_t as every task's own full SVD side by side (no orthogonalisation): AdaRank's
    starting point in its authors' code."""
    n_tasks, m, n = taus.shape
    u, s, vh = torch.linalg.svd(taus, full_matrices=False)
    r = s.shape[1]
    return Spectrum(u.permute(1, 0, 2).reshape(m, n_tasks * r), s.reshape(-1), vh.reshape(n_tasks * r, n),
                    torch.arange(n_tasks).repeat_interleave(r))
